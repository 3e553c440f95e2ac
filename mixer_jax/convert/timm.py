"""timm / PyTorch state dicts <-> mixer_jax variables, for all three families (and the official ConvMixer and
DaViT key layouts, mapped to timm's first by `timm_layout`).

A flax variable path maps to a timm key by a per-family list of regex rewrites of its module path (applied in
order, like timm's own `checkpoint_filter_fn`), plus the leaf name (kernel/scale -> weight, mean/var ->
running_mean/running_var). Layouts follow the leaf: 4-D kernels are OIHW <-> HWIO, 2-D kernels are transposed,
everything else is copied. `convert.from_timm` fits a state dict onto a model with these (`convert.fit`: names
and shapes checked, every problem in one error); `to_timm` writes one.

timm's Mixer weights were trained with the exact GELU: build the model with `act='gelu'` to use them.
PyTorch's BatchNorm `num_batches_tracked` counter has no flax counterpart (it only matters for cumulative-average
BatchNorm, which ConvMixer does not use): it is ignored on the way in and exported as 0.
"""
import math
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


def to_flax_layout(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x.T if leaf == 'kernel' and x.ndim == 2 else x


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  return _to_torch_layout(np.empty(shape, np.bool_), leaf).shape


def ignored(key: str) -> bool:
  """State-dict entries with no flax counterpart, skipped on the way in."""
  return key.endswith(_IGNORED_SUFFIX)


def checkpoint_options(family: str, state_dict: Mapping[str, Any], patch_size: int | None = None) -> dict:
  """Model options the weights themselves fix: the head's classes (0: no head) and a Mixer's token MLP width
  and square grid of tokens (as image_size at `patch_size`, default the stem's: see `convert.patch_size`)."""
  head = 'head.fc.bias' if family == 'davit' else 'head.bias'
  options = {'num_classes': int(np.shape(state_dict[head])[0]) if head in state_dict else 0}
  if family == 'mixer' and 'blocks.0.mlp_tokens.fc1.weight' in state_dict:
    options['tokens_mlp_dim'], tokens = np.shape(state_dict['blocks.0.mlp_tokens.fc1.weight'])
    options['image_size'] = math.isqrt(tokens) * (patch_size or np.shape(state_dict['stem.proj.weight'])[-1])
  return options


# The official dingmyu/davit key names -> timm's (the rules of timm's davit checkpoint_filter_fn, in order).
_OFFICIAL_DAVIT = [
    (r'patch_embeds\.(\d+)', r'stages.\1.downsample'),
    (r'main_blocks\.(\d+)', r'stages.\1.blocks'),
    (r'downsample\.proj', 'downsample.conv'),
    (r'stages\.0\.downsample', 'stem'),
    (r'^head\.', 'head.fc.'),
    (r'^norms\.', 'head.norm.'),
    (r'cpe\.0', 'cpe1'),
    (r'cpe\.1', 'cpe2'),
]


def _official_convmixer_key(key: str, depth: int) -> str:
  """The official bare nn.Sequential: 0 stem conv, 2 stem BN, 3..depth+2 blocks, depth+5 the head."""
  index, _, rest = key.partition('.')
  index = int(index)
  if index in (0, 2):
    return f'stem.{index}.{rest}'
  if index == depth + 5:
    return f'head.{rest}'
  return f'blocks.{index - 3}.{rest}'


def timm_layout(family: str, state_dict: Mapping[str, Any]) -> dict:
  """timm keys from the official ConvMixer (locuslab v1.0 release) or DaViT (dingmyu/davit) key layouts; timm
  state dicts pass through. Layouts are detected by their keys, never assumed."""
  if family == 'convmixer' and '0.weight' in state_dict and 'stem.0.weight' not in state_dict:
    depth = max(int(k.partition('.')[0]) for k in state_dict) - 5
    return {_official_convmixer_key(k, depth): v for k, v in state_dict.items()}
  if family == 'davit' and any(k.startswith('patch_embeds.') for k in state_dict):
    out = {}
    for key, value in state_dict.items():
      for pattern, replacement in _OFFICIAL_DAVIT:
        key = re.sub(pattern, replacement, key)
      out[key] = value
    return out
  return dict(state_dict)


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
