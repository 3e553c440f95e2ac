"""Fitting a checkpoint's arrays onto a freshly built model: every name and shape checked, all problems in one error.

The model is only traced (`jax.eval_shape`): nothing is allocated or computed. Each converter supplies how a
variable path is named in its format (`key_of`) and how an array's layout maps onto flax's (`to_flax`).
"""
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from mixer_jax import models
from mixer_jax.convert import scan

Path = tuple[str, ...]
SHOWN = 6  # keys named per kind of problem (the count says how many there are): the error stays readable


def fit(name: str, model, source: Mapping[str, Any], *, key_of: Callable[[Path], str],
        to_flax: Callable[[np.ndarray, Path], np.ndarray] = lambda x, path: x,
        shown_shape: Callable[[tuple, Path], tuple] = lambda shape, path: shape,
        ignored: Callable[[str], bool] = lambda key: False, what: str = 'checkpoint') -> dict:
  """Variables of `model` (the registered model `name`) taken from `source[key_of(path)]`, cast to its dtypes.

  Raises one ValueError counting the missing, unexpected (not `ignored`) and mis-shaped keys and naming the first
  few of each; shapes are shown in the source's layout (`shown_shape` maps a flax shape there).
  """
  scanned = getattr(model, 'scan_blocks', False)  # checkpoints hold the per-block layout: fit that, then stack
  expected = traverse_util.flatten_dict(models.abstract_variables(model.clone(scan_blocks=False) if scanned
                                                                  else model))
  flat, missing, misshaped, used = {}, [], [], set()
  for path, target in expected.items():
    key = key_of(path)
    if key not in source:
      missing.append(key)
      continue
    used.add(key)
    value = to_flax(to_numpy(source[key]), path)
    if value.shape != target.shape:
      misshaped.append(f'{key} {tuple(np.shape(source[key]))} (expected {shown_shape(target.shape, path)})')
      continue
    flat[path] = value.astype(target.dtype)
  unexpected = [k for k in source if k not in used and not ignored(k)]
  problems = [f'{len(keys)} {kind}: {_listed(keys)}' for kind, keys in
              (('missing', missing), ('unexpected', unexpected), ('with the wrong shape', misshaped)) if keys]
  if problems:
    raise ValueError(f'{what} does not fit {name} (num_classes={model.num_classes}, '
                     f'image_size={model.image_size}): {"; ".join(problems)}: build the model the checkpoint was '
                     'saved from (its name and options)')
  variables = traverse_util.unflatten_dict(flat)
  return scan.stack(variables, name) if scanned else variables


def patch_size(name: str, overrides: Mapping[str, Any]) -> int:
  """The patch size of the Mixer `name` built with `overrides`. A checkpoint's token grid times it is the image size
  to build the model for: with the checkpoint's own patch size instead, a checkpoint of another patch size would
  fail to build (an image size the patch does not divide) rather than show its mismatched shapes."""
  return models.pair(overrides.get('patch_size', models.variant(name).kwargs['patch_size']))[0]


def _listed(keys: list[str]) -> str:
  # The shallowest names first: a stem or head that does not fit tells most about which model a checkpoint is.
  keys = sorted(keys, key=lambda key: len(re.split('[./]', key)))
  more = f', ... ({len(keys) - SHOWN} more)' if len(keys) > SHOWN else ''
  return ', '.join(keys[:SHOWN]) + more


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (without importing torch) or an array-like as numpy; bfloat16 tensors become float32."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)
