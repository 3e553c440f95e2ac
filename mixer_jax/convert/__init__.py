"""Checkpoint converters: external weight formats <-> mixer_jax variables, always name- and shape-checked.

  load(path, name, **options)        any supported checkpoint -> variables of the registered model `name`
  run_config(path) / run_model(run)  what train.py recorded in a workdir's config.json: the run, its model
  save(variables, path, name, fmt)   variables -> 'npz' (Google's Mixer layout), 'timm' (.safetensors / .pth) or
                                     'orbax' (a directory `load` and fine-tuning read back)
  from_timm / to_timm                timm (PyTorch) state dicts of all three families
  fit(name, model, source, ...)      a checkpoint's arrays onto a model: every name and shape checked, all
                                     problems in one error (each format supplies its key names and layouts)
  load_for_finetuning / merge        `config.init`: the checkpoint adapted to the fine-tuned model (a Mixer's
                                     token-mixing resize), then merged into it with a fresh zero head

Formats by path: Google's Mixer `.npz` (standard and legacy layouts, npz.py), timm / PyTorch `.safetensors` and
`.pth`/`.pth.tar`/`.pt`/`.bin` (timm keys, or the official ConvMixer / DaViT layouts, timm.py), and orbax
checkpoint directories (a training workdir, or the output of `save(..., 'orbax')`). Reading a file never executes
code (files.py). Every function here sees the published per-block layout only: a training workdir of a
`scan_blocks=True` run is split on reading and `save` splits what it is given (`models.unstack_blocks`); a caller
that runs a scanned model stacks the result itself (`models.stack_blocks`).
"""
import dataclasses
import json
import os
import re
import tempfile
import types
import typing
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from mixer_jax import cli, models, paths
from mixer_jax.convert import files, npz, resize, timm
from mixer_jax.convert.timm import to_timm

__all__ = ['load', 'save', 'from_timm', 'to_timm', 'fit', 'load_for_finetuning', 'merge', 'run_config', 'run_model']
FORMATS = ('npz', 'timm', 'orbax')
# Options a checkpoint's arrays decide (its head, a Mixer's token grid), never a config or a flag.
CHECKPOINT_OPTIONS = ('num_classes', 'image_size', 'tokens_mlp_dim')
RUN_CONFIG = 'config.json'  # what train.py writes in its workdir (trainer.write_config)
HEAD = ('params', 'head')
Path = tuple[str, ...]
SHOWN = 6  # keys named per kind of problem (the count says how many there are): the error stays readable


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
  size at `patch_size` (default: the checkpoint's own, see `patch_size`), and token MLP width."""
  options = {'num_classes': int(np.shape(params['head']['bias'])[0]) if 'head' in params else 0}
  if models.family(name) == 'mixer' and 'MixerBlock_0' in params:
    (rows, _), options['tokens_mlp_dim'] = resize.mixer_token_grid(params)
    options['image_size'] = rows * (patch_size or np.shape(params['stem']['kernel'])[0])
  return options


def patch_size(name: str, overrides: Mapping[str, Any]) -> int:
  """The patch size of the Mixer `name` built with `overrides`. A checkpoint's token grid times it is the image size
  to build the model for: with the checkpoint's own patch size instead, a checkpoint of another patch size would
  fail to build (an image size the patch does not divide) rather than show its mismatched shapes."""
  return models.pair(overrides.get('patch_size', models.variant(name).kwargs['patch_size']))[0]


def run_config(path: str) -> dict | None:
  """The config.json that train.py wrote in the training workdir `path` (or the workdir of `path`, its checkpoints/
  folder or one step of it) as a dict, the model options its `config.init` decided (`init_overrides`, e.g. a
  resized Mixer's tokens_mlp_dim) folded into its `model`; None where `path` is not in a training workdir."""
  path = paths.resolve(path)
  parent = os.path.dirname(path)
  candidates = [path]
  if os.path.basename(path) == 'checkpoints':
    candidates.append(parent)
  elif os.path.basename(path).isdigit() and os.path.basename(parent) == 'checkpoints':
    candidates.append(os.path.dirname(parent))
  config_path = next((f for f in (paths.join(c, RUN_CONFIG) for c in candidates) if paths.at(f).is_file()), None)
  if config_path is None:
    return None
  try:
    record = json.loads(paths.at(config_path).read_text())
  except ValueError:  # not JSON
    record = None
  model = record.get('model') if isinstance(record, dict) else None
  if not (isinstance(model, dict) and isinstance(model.get('name'), str)):
    raise ValueError(f'{config_path} is not a training config (it names no model.name): repair it, or give --model '
                     'and --model_options')
  return {**record, 'model': {**model, **(record.get('init_overrides') or {})}}


def run_model(run: dict) -> tuple[str, dict]:
  """(name, options) of the model of a `run_config`."""
  options = dict(run['model'])
  return options.pop('name'), options


def load(path: str, name: str, **overrides) -> dict:
  """Variables {'params': ..., ['batch_stats': ...]} (numpy) of model `name` from any supported checkpoint.

  The model they must fit is built with `overrides`; by default with the checkpoint's own number of classes
  (its head) and, for a Mixer, its own token grid at the model's patch size, and for a training workdir of a
  model `name` with the options its config.json records (`run_config`); options that only change how the model
  runs (`scan_blocks`, `remat`) do not change what is returned, the per-block layout. One ValueError lists the
  names and shapes that do not fit.
  """
  path = files.local(path)
  fmt = files.checkpoint_format(path)
  run = run_config(path) if fmt == 'orbax' else None
  if run is not None and run['model']['name'] == name:
    overrides = {**run_model(run)[1], **overrides}
  family = models.family(name)
  if fmt in ('safetensors', 'torch'):
    state_dict = timm.timm_layout(family, files.read_state_dict(path))
    return from_timm(name, state_dict, **overrides)
  if fmt == 'npz' and family != 'mixer':
    raise ValueError(f'{path}: .npz checkpoints are Google\'s MLP-Mixer files; {name} is a {family}: give a Mixer '
                     'model')
  variables = {'params': npz.read(path)} if fmt == 'npz' else models.unstack_blocks(files.read_orbax(path), name)
  fixed = tree_options(name, variables['params'], patch_size(name, overrides) if family == 'mixer' else None)
  model = models.create(name, **{**fixed, **overrides})
  flat = traverse_util.flatten_dict(variables, sep='/')
  return fit(name, model, flat, key_of='/'.join, what=f'{os.path.basename(path.rstrip("/"))}')


def save(variables, path: str, name: str, fmt: str) -> None:
  """Writes variables of model `name` as `fmt`: 'npz', 'timm' (.safetensors, or .pth) or 'orbax', always in the
  per-block layout (a scanned model's stacked blocks are split)."""
  variables = models.unstack_blocks(dict(variables), name)
  path = paths.resolve(path)
  if paths.is_url(path) and fmt != 'orbax':  # orbax writes to buckets itself; a file is written here, then uploaded
    with tempfile.TemporaryDirectory() as folder:
      local = os.path.join(folder, os.path.basename(path))
      save(variables, local, name, fmt)
      paths.at(path).write_bytes(paths.at(local).read_bytes())
    return
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


def from_timm(name: str, state_dict: Mapping[str, Any], **overrides) -> dict:
  """timm state dict (numpy arrays or torch tensors) -> variables {'params': ..., ['batch_stats': ...]}.

  `overrides` are options of the model the weights must fit (`image_size`, `num_classes`, ...); by default the
  number of classes is the state dict's head and a Mixer's image size its token grid. Raises one ValueError
  listing every missing, unexpected and mis-shaped key.
  """
  family = models.family(name)
  patch = patch_size(name, overrides) if family == 'mixer' else None
  options = {**timm.checkpoint_options(family, state_dict, patch), **overrides}
  model = models.create(name, **options)
  return fit(name, model, state_dict, key_of=lambda path: timm.timm_key(family, path),
             to_flax=lambda x, path: timm.to_flax_layout(x, path[-1]),
             shown_shape=lambda shape, path: timm.torch_shape(shape, path[-1]),
             ignored=timm.ignored, what='state dict')


def fit(name: str, model, source: Mapping[str, Any], *, key_of: Callable[[Path], str],
        to_flax: Callable[[np.ndarray, Path], np.ndarray] = lambda x, path: x,
        shown_shape: Callable[[tuple, Path], tuple] = lambda shape, path: shape,
        ignored: Callable[[str], bool] = lambda key: False, what: str = 'checkpoint') -> dict:
  """Per-block variables of `model` (the registered model `name`) taken from `source[key_of(path)]` and laid out by
  `to_flax`, cast to the model's dtypes. The model is only traced: nothing is allocated or computed.

  Raises one ValueError counting the missing, unexpected (not `ignored`) and mis-shaped keys and naming the first
  few of each; shapes are shown in the source's layout (`shown_shape` maps a flax shape there).
  """
  expected = traverse_util.flatten_dict(models.abstract_variables(models.per_block(model)))
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
  return traverse_util.unflatten_dict(flat)


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


def load_for_finetuning(path: str, name: str, options: dict, *, image_size, resize_method: str = 'blocks'):
  """(variables, model overrides, notes) for fine-tuning `name` with model `options` at `image_size`, from any
  checkpoint `load` reads: the config's architecture options, but the checkpoint's own head and token grid. A
  Mixer whose token grid differs from `image_size`'s gets the paper's block-diagonal token-mixing expansion
  (resize.py, `resize_method`); the overrides give the `tokens_mlp_dim` the fine-tuned model is built with.
  ConvMixer and DaViT run at any resolution as they are."""
  # float32 whatever the run's dtypes: the resize is computed at full precision and `merge` casts.
  architecture = {k: v for k, v in options.items() if k not in CHECKPOINT_OPTIONS + ('dtype', 'param_dtype')}
  variables = load(path, name, **architecture)
  notes, overrides = [], {}
  if models.family(name) == 'mixer':
    old_grid, _ = resize.mixer_token_grid(variables['params'])
    new_grid = tuple(s // patch_size(name, options) for s in models.pair(image_size))
    if old_grid != new_grid:
      params, tokens_mlp_dim = resize.resize_mixer(variables['params'], old_grid=old_grid, new_grid=new_grid,
                                                   method=resize_method)
      variables = {**variables, 'params': jax.tree.map(np.asarray, params)}
      notes.append(f'token mixing {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} tokens '
                   f'({resize_method}), tokens_mlp_dim {tokens_mlp_dim}')
    overrides['tokens_mlp_dim'] = resize.mixer_token_grid(variables['params'])[1]
  return variables, overrides, notes


def merge(pretrained_variables, fresh_variables, *, keep_head: bool = False):
  """(variables, report) of the fine-tuned model: every pre-trained array whose name and shape match, cast to
  the fine-tuned dtype, except the classifier: as in vit_jax's fine-tuning, the head (`head/kernel`, `head/bias`)
  starts at zeros even when the checkpoint's has as many classes; `keep_head` keeps one of the right size. Raises
  one ValueError listing any other mismatch. `fresh_variables` (per-block layout) gives names, shapes and dtypes
  only: arrays or ShapeDtypeStructs."""
  old = traverse_util.flatten_dict(pretrained_variables)
  new = traverse_util.flatten_dict(fresh_variables)
  merged, reinitialised, problems = {}, [], []
  for path, fresh in new.items():
    source = old.get(path)
    fits = source is not None and np.shape(source) == np.shape(fresh)
    if path[:2] == HEAD and not (keep_head and fits):
      merged[path] = np.zeros(np.shape(fresh), fresh.dtype)
      reinitialised.append('/'.join(path[1:]))
    elif fits:
      merged[path] = np.asarray(source, fresh.dtype)
    else:
      problems.append(f'{"/".join(path)} ' + ('missing' if source is None else
                                             f'{np.shape(source)} (expected {np.shape(fresh)})'))
  if problems:
    raise ValueError(f'the pre-trained checkpoint does not fit the model: {"; ".join(problems)}')
  left_out = sorted('/'.join(p[1:]) for p in old if p not in new)
  report = (f'loaded {len(merged) - len(reinitialised)} arrays; re-initialised (zeros): '
            f'{", ".join(reinitialised) or "none"}; left out: {", ".join(left_out) or "none"}')
  return traverse_util.unflatten_dict(merged), report
