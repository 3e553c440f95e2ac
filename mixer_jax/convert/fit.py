"""Fitting a checkpoint's arrays onto a freshly built model: every name and shape checked, all problems in one error.

The model is only traced (`jax.eval_shape`): nothing is allocated or computed. Each converter supplies how a
variable path is named in its format (`key_of`) and how an array's layout maps onto flax's (`to_flax`).
"""
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from mixer_jax import models
from mixer_jax.convert import scan

Path = tuple[str, ...]


def fit(name: str, model, source: Mapping[str, Any], *, key_of: Callable[[Path], str],
        to_flax: Callable[[np.ndarray, Path], np.ndarray] = lambda x, path: x,
        shown_shape: Callable[[tuple, Path], tuple] = lambda shape, path: shape,
        ignored: Callable[[str], bool] = lambda key: False, what: str = 'checkpoint') -> dict:
  """Variables of `model` (the registered model `name`) taken from `source[key_of(path)]`, cast to its dtypes.

  Raises one ValueError listing every missing, unexpected (not `ignored`) and mis-shaped key; shapes are shown
  in the source's layout (`shown_shape` maps a flax shape there).
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
  problems = [f'{len(keys)} {kind}: {", ".join(keys)}' for kind, keys in
              (('missing', missing), ('unexpected', unexpected), ('with the wrong shape', misshaped)) if keys]
  if problems:
    raise ValueError(f'{what} does not fit {name} (num_classes={model.num_classes}, '
                     f'image_size={model.image_size}): {"; ".join(problems)}')
  variables = traverse_util.unflatten_dict(flat)
  return scan.stack(variables, name) if scanned else variables


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (without importing torch) or an array-like as numpy; bfloat16 tensors become float32."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)
