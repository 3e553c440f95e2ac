"""Checkpoint converters: external weight formats <-> mixer_jax variables, always name- and shape-checked.

  load(path, name, **overrides)      any supported checkpoint -> variables of the registered model `name`
  save(variables, path, name, fmt)   variables -> 'npz' (Google's Mixer layout), 'timm' (.safetensors / .pth) or
                                     'orbax' (a directory `load` and fine-tuning read back)
  from_timm / to_timm                timm (PyTorch) state dicts of all three families

Formats by path: Google's Mixer `.npz` (standard and legacy layouts), timm / PyTorch `.safetensors` and
`.pth`/`.pth.tar`/`.pt`/`.bin` (timm keys, or the official ConvMixer / DaViT layouts), and orbax checkpoint
directories (a training workdir, or the output of `save(..., 'orbax')`). Nothing loaded ever executes code.
Files always hold the per-block layout; `scan_blocks=True` models get it stacked (`convert.scan`).
"""
import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from mixer_jax import cli, models
from mixer_jax.convert import files, fit, npz, resize, scan
from mixer_jax.convert.timm import from_timm, timm_layout, to_timm

__all__ = ['load', 'save', 'from_timm', 'to_timm']
FORMATS = ('npz', 'timm', 'orbax')


def check_model(name: str, options: Mapping[str, Any], name_from: str = '--model') -> None:
  """For the command-line tools, before they read anything: a one-line ValueError unless `name` (given by
  `name_from`) is a registered model and `options` (their `--model_options`) are fields of it with values of the
  field's type."""
  if name not in models.names():
    raise ValueError(f'{name_from}: unknown model {name!r}{cli.did_you_mean(name, models.names())}; known models: '
                     f'{", ".join(models.names())}')
  fields = {f.name: f.type for f in dataclasses.fields(models.variant(name).module)}
  for key, value in options.items():
    if key not in models.options(name):
      hint = cli.did_you_mean(key, models.options(name))
      raise ValueError(f'--model_options: {name} has no option {key!r}{hint}; its options: '
                       f'{", ".join(models.options(name))}')
    if not _takes(fields[key], value):
      raise ValueError(f'--model_options: {key}={value!r} does not fit {name}, whose {key} is of type '
                       f'{_type_name(fields[key])}')


def _takes(annotation, value) -> bool:
  """Whether a model field annotated `annotation` holds `value` as `cli.parse_options` gives it (ints fit floats)."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if annotation is typing.Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_takes(a, value) for a in args)
  if origin is not None:  # Sequence[int] and the like: a tuple or list of such values
    return isinstance(value, (tuple, list)) and all(_takes(args[0], v) for v in value)
  if isinstance(value, bool):  # a bool is an int to Python, never to a model
    return annotation is bool
  return isinstance(value, (int, float) if annotation is float else annotation)


def _type_name(annotation) -> str:
  return getattr(annotation, '__name__', str(annotation).replace('typing.', ''))


def tree_options(name: str, params, patch_size: int | None = None) -> dict:
  """Model options a flax parameter tree fixes: the head's classes and a Mixer's (square) token grid, as the image
  size at `patch_size` (default: the checkpoint's own, see `fit.patch_size`), and token MLP width."""
  options = {'num_classes': int(np.shape(params['head']['bias'])[0]) if 'head' in params else 0}
  if models.family(name) == 'mixer':
    params = scan.unstack({'params': params}, name)['params']  # a scanned model's blocks, split
    if 'MixerBlock_0' in params:
      (rows, _), options['tokens_mlp_dim'] = resize.mixer_token_grid(params)
      options['image_size'] = rows * (patch_size or np.shape(params['stem']['kernel'])[0])
  return options


def load(path: str, name: str, **overrides) -> dict:
  """Variables {'params': ..., ['batch_stats': ...]} (numpy) of model `name` from any supported checkpoint.

  The model they must fit is built with `overrides`; by default with the checkpoint's own number of classes
  (its head) and, for a Mixer, its own token grid at the model's patch size. One ValueError lists the names and
  shapes that do not fit.
  """
  fmt = files.checkpoint_format(path)
  family = models.family(name)
  if fmt in ('safetensors', 'torch'):
    state_dict = timm_layout(family, files.read_state_dict(path))
    return from_timm(name, state_dict, **overrides)
  if fmt == 'npz' and family != 'mixer':
    raise ValueError(f'{path}: .npz checkpoints are Google\'s MLP-Mixer files; {name} is a {family}: give a Mixer '
                     'model')
  variables = {'params': npz.read(path)} if fmt == 'npz' else scan.unstack(files.read_orbax(path), name)
  fixed = tree_options(name, variables['params'], fit.patch_size(name, overrides) if family == 'mixer' else None)
  model = models.create(name, **{**fixed, **overrides})
  flat = traverse_util.flatten_dict(variables, sep='/')
  return fit.fit(name, model, flat, key_of='/'.join, what=f'{os.path.basename(path.rstrip("/"))}')


def save(variables, path: str, name: str, fmt: str) -> None:
  """Writes variables of model `name` as `fmt`: 'npz', 'timm' (.safetensors, or .pth) or 'orbax', always in the
  per-block layout (a scanned model's stacked blocks are split)."""
  variables = scan.unstack(dict(variables), name)
  if fmt == 'npz':
    if models.family(name) != 'mixer':
      raise ValueError(f'.npz export is Google\'s MLP-Mixer layout; {name} is not a Mixer')
    npz.write(variables['params'], path)
  elif fmt == 'timm':
    state_dict = to_timm(name, variables)
    if path.endswith('.safetensors'):
      from safetensors.numpy import save_file
      save_file(state_dict, path)
    else:
      import torch
      torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  elif fmt == 'orbax':
    files.write_orbax(dict(variables), path)
  else:
    raise ValueError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
