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
import os

import numpy as np
from flax import traverse_util

from mixer_jax import models
from mixer_jax.convert import files, fit, npz, resize, scan
from mixer_jax.convert.timm import from_timm, timm_layout, to_timm

__all__ = ['load', 'save', 'from_timm', 'to_timm']
FORMATS = ('npz', 'timm', 'orbax')


def tree_options(name: str, params) -> dict:
  """Model options a flax parameter tree fixes: the head's classes and a Mixer's (square) token grid and token
  MLP width."""
  options = {'num_classes': int(np.shape(params['head']['bias'])[0]) if 'head' in params else 0}
  if models.family(name) == 'mixer':
    params = scan.unstack({'params': params}, name)['params']  # a scanned model's blocks, split
    if 'MixerBlock_0' in params:
      (rows, _), options['tokens_mlp_dim'] = resize.mixer_token_grid(params)
      options['image_size'] = rows * np.shape(params['stem']['kernel'])[0]
  return options


def load(path: str, name: str, **overrides) -> dict:
  """Variables {'params': ..., ['batch_stats': ...]} (numpy) of model `name` from any supported checkpoint.

  The model they must fit is built with `overrides`; by default with the checkpoint's own number of classes
  (its head) and, for a Mixer, its own token grid. One ValueError lists every name or shape that does not fit.
  """
  fmt = files.checkpoint_format(path)
  family = models.family(name)
  if fmt in ('safetensors', 'torch'):
    state_dict = timm_layout(family, files.read_state_dict(path))
    return from_timm(name, state_dict, **overrides)
  if fmt == 'npz' and family != 'mixer':
    raise ValueError(f'{path}: .npz checkpoints are Google\'s MLP-Mixer files; {name} is a {family}')
  variables = {'params': npz.read(path)} if fmt == 'npz' else scan.unstack(files.read_orbax(path), name)
  model = models.create(name, **{**tree_options(name, variables['params']), **overrides})
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
