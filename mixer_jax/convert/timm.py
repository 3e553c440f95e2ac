"""timm / PyTorch state dicts <-> mixer_jax variables, for all three families.

A flax variable path maps to a timm key by a per-family list of regex rewrites of its module path (applied in
order, like timm's own `checkpoint_filter_fn`), plus the leaf name (kernel/scale -> weight, mean/var ->
running_mean/running_var). Layouts follow the leaf: 4-D kernels are OIHW <-> HWIO, 2-D kernels are transposed,
everything else is copied. Names and shapes are checked against a freshly built model (`jax.eval_shape`, nothing
allocated) and every problem is reported in one error.

timm's Mixer weights were trained with the exact GELU: build the model with `act='gelu'` to use them.
PyTorch's BatchNorm `num_batches_tracked` counter has no flax counterpart (it only matters for cumulative-average
BatchNorm, which ConvMixer does not use): it is ignored on the way in and exported as 0.
"""
import re
from typing import Any, Mapping

import numpy as np
import jax
from flax import traverse_util

from mixer_jax import models

_RULES = {
    'mixer': [
        (r'^stem$', 'stem/proj'),
        (r'^MixerBlock_(\d+)/', r'blocks/\1/'),
        (r'/LayerNorm_0$', '/norm1'),
        (r'/LayerNorm_1$', '/norm2'),
        (r'/token_mixing/', '/mlp_tokens/'),
        (r'/channel_mixing/', '/mlp_channels/'),
        (r'/Dense_0$', '/fc1'),
        (r'/Dense_1$', '/fc2'),
        (r'^pre_head_layer_norm$', 'norm'),
    ],
    'convmixer': [
        (r'^stem$', 'stem/0'),
        (r'^stem_norm$', 'stem/2'),
        (r'^ConvMixerBlock_(\d+)/', r'blocks/\1/'),
        (r'/depthwise$', '/0/fn/0'),
        (r'/depthwise_norm$', '/0/fn/2'),
        (r'/pointwise$', '/1'),
        (r'/pointwise_norm$', '/3'),
    ],
    'davit': [
        (r'^stem$', 'stem/conv'),
        (r'^stem_norm$', 'stem/norm'),
        (r'^stage_(\d+)_downsample_norm$', r'stages/\1/downsample/norm'),
        (r'^stage_(\d+)_downsample$', r'stages/\1/downsample/conv'),
        (r'^stage_(\d+)_spatial_block_(\d+)/', r'stages/\1/blocks/\2/0/'),
        (r'^stage_(\d+)_channel_block_(\d+)/', r'stages/\1/blocks/\2/1/'),
        (r'/cpe([12])$', r'/cpe\1/proj'),
        (r'/(window|channel)_attention/', '/attn/'),
        (r'/Dense_0$', '/fc1'),
        (r'/Dense_1$', '/fc2'),
        (r'^head_norm$', 'head/norm'),
        (r'^head$', 'head/fc'),
    ],
}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_IGNORED_SUFFIX = '.num_batches_tracked'


def timm_key(family: str, path: tuple[str, ...]) -> str:
  """('params', *modules, leaf) -> the timm state-dict key."""
  module = '/'.join(path[1:-1])
  for pattern, replacement in _RULES[family]:
    module = re.sub(pattern, replacement, module)
  return f'{module}/{_LEAVES[path[-1]]}'.replace('/', '.')


def _to_torch_layout(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x.T if leaf == 'kernel' and x.ndim == 2 else x


def _to_flax_layout(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x.T if leaf == 'kernel' and x.ndim == 2 else x


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  return _to_torch_layout(np.empty(shape, np.bool_), leaf).shape


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (without importing torch) or an array-like as numpy; bfloat16 tensors become float32."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _head_classes(family: str, state_dict: Mapping[str, Any]) -> int:
  key = 'head.fc.bias' if family == 'davit' else 'head.bias'
  return int(np.shape(state_dict[key])[0]) if key in state_dict else 0


def from_timm(name: str, state_dict: Mapping[str, Any], **overrides) -> dict:
  """timm state dict (numpy arrays or torch tensors) -> variables {'params': ..., ['batch_stats': ...]}.

  `overrides` are model options (`image_size`, `num_classes`, ...) of the model the weights must fit; the
  number of classes defaults to the state dict's head. Raises one ValueError listing every missing,
  unexpected and mis-shaped key.
  """
  family = models.family(name)
  num_classes = overrides.pop('num_classes', _head_classes(family, state_dict))
  model = models.create(name, num_classes=num_classes, **overrides)
  expected = traverse_util.flatten_dict(models.abstract_variables(model))
  flat, missing, misshaped, used = {}, [], [], set()
  for path, target in expected.items():
    key = timm_key(family, path)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = _to_flax_layout(to_numpy(state_dict[key]), path[-1])
    if value.shape != target.shape:
      misshaped.append(f'{key} {tuple(np.shape(state_dict[key]))} (expected {_torch_shape(target.shape, path[-1])})')
      continue
    flat[path] = value.astype(target.dtype)
  unexpected = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX)]
  problems = [f'{len(keys)} {kind}: {", ".join(keys)}' for kind, keys in
              (('missing', missing), ('unexpected', unexpected), ('with the wrong shape', misshaped)) if keys]
  if problems:
    raise ValueError(f'state dict does not fit {name} (num_classes={num_classes}, '
                     f'image_size={model.image_size}): {"; ".join(problems)}')
  return traverse_util.unflatten_dict(flat)


def to_timm(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """mixer_jax variables -> a timm state dict of numpy arrays (load with `torch.from_numpy` per tensor)."""
  family = models.family(name)
  state_dict = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(dict(variables))).items():
    key = timm_key(family, path)
    state_dict[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), path[-1]))
    if path[-1] == 'var':  # a BatchNorm: restore PyTorch's counter next to its running statistics
      state_dict[key.replace('.running_var', _IGNORED_SUFFIX)] = np.array(0, np.int64)
  return state_dict
