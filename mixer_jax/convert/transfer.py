"""Starting a fine-tuning run from a pre-trained checkpoint (`config.init`): load, adapt, merge, report.

`pretrained(path, name, options, image_size, resize)` reads any checkpoint `convert.load` reads (Google .npz,
timm/PyTorch files, orbax workdirs), as the model `name` with the config's architecture options but the
checkpoint's own head and token grid. A Mixer whose token grid differs from the fine-tuning resolution gets the
paper's block-diagonal token-mixing expansion (`resize`, see convert/resize.py) and returns the
`tokens_mlp_dim` the fine-tuned model must be built with. ConvMixer and DaViT run at any resolution as they are.

`merge(pretrained, fresh, keep_head=False)` then takes every pre-trained array whose name and shape match the
fine-tuned model (its arrays or just their shapes), except the classifier: as in vit_jax's fine-tuning, the head
(`head/kernel`, `head/bias`) always starts at zeros, even when the checkpoint's has as many classes (an ImageNet-1k
checkpoint fine-tuned on ImageNet-1k). `keep_head=True` keeps a head of the right size. Any other mismatch is an
error listing them all.
"""
import jax
import numpy as np
from flax import traverse_util

from mixer_jax import models
from mixer_jax.convert import load, resize, scan

HEAD = ('params', 'head')
# Options the checkpoint itself decides (its head, its grid) rather than the fine-tuning config.
CHECKPOINT_OPTIONS = ('num_classes', 'image_size', 'tokens_mlp_dim')


def pretrained(path: str, name: str, options: dict, *, image_size, resize_method: str = 'blocks'):
  """(variables, model overrides for the fine-tuned model, notes) for fine-tuning `name` at `image_size`."""
  architecture = {k: v for k, v in options.items()
                  if k not in CHECKPOINT_OPTIONS + ('dtype', 'param_dtype', 'scan_blocks')}
  variables = load(path, name, **architecture)  # per-block layout: the resizing below works on it
  notes, overrides = [], {}
  if models.family(name) == 'mixer':
    patch = options.get('patch_size') or models.variant(name).kwargs['patch_size']
    old_grid, _ = resize.mixer_token_grid(variables['params'])
    new_grid = tuple(s // patch for s in models.pair(image_size))
    if old_grid != new_grid:
      params, tokens_mlp_dim = resize.resize_mixer(variables['params'], old_grid=old_grid, new_grid=new_grid,
                                                   method=resize_method)
      variables = {**variables, 'params': jax.tree.map(np.asarray, params)}
      notes.append(f'token mixing {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} tokens '
                   f'({resize_method}), tokens_mlp_dim {tokens_mlp_dim}')
    overrides['tokens_mlp_dim'] = resize.mixer_token_grid(variables['params'])[1]
  if options.get('scan_blocks'):
    variables = scan.stack(variables, name)
  return variables, overrides, notes


def merge(pretrained_variables, fresh_variables, *, keep_head: bool = False):
  """(variables, report) of the fine-tuned model: pre-trained arrays where names and shapes match, a zero head
  (the pre-trained one with `keep_head`, where it has the right size). Raises one ValueError for any other
  mismatch. `fresh_variables` gives names, shapes and dtypes only: arrays or ShapeDtypeStructs."""
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
