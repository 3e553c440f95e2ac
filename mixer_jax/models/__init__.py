"""The model registry: every published variant by name, and helpers to initialise variables.

`create(name, *, num_classes, platform=None, **overrides)` builds a flax.linen module; overrides are the module's
fields (`image_size`, `dtype`, `act`, `stoch_depth` / `drop_path_rate`, ...). Choices that depend on the hardware
(`depthwise`) left unset or 'auto' are made for `platform`, the one the model is compiled for (default: JAX's
default backend; a TPU program compiled on a CPU machine passes 'tpu'). Configs, converters and benchmarks
refer to models by these names.

`scan_blocks=True` changes the variables' layout (`SCANNED_BLOCKS`); `stack_blocks` / `unstack_blocks` are the one
place that layout is converted, so everything outside a train state sees the published per-block variables.
"""
import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from mixer_jax.models.convmixer import ConvMixer
from mixer_jax.models.davit import DaViT
from mixer_jax.models import layers
from mixer_jax.models.layers import pair
from mixer_jax.models.mlp_mixer import MlpMixer

# Options that change how a model runs (precision, memory, kernels), not the function it computes.
RUN_OPTIONS = ('dtype', 'param_dtype', 'remat', 'scan_blocks', 'depthwise', 'attention_impl')
# Compute and parameter dtypes a config may name (LayerNorm, softmax and the loss stay float32 whatever is set).
DTYPES = ('float32', 'bfloat16', 'float16')


class Variant(NamedTuple):
  module: type[nn.Module]
  kwargs: dict[str, Any]
  timm_name: str | None  # the timm architecture with the same parameters (None: timm registers none)


def _mixer(width, depth, patch):
  # D_S = C/2 and D_C = 4C for every published Mixer.
  return dict(patch_size=patch, hidden_dim=width, num_blocks=depth, tokens_mlp_dim=width // 2,
              channels_mlp_dim=4 * width)


def _davit(dims, depths):
  return dict(dims=dims, depths=depths, num_heads=tuple(d // 32 for d in dims))  # head_dim 32 everywhere


VARIANTS: dict[str, Variant] = {
    'mixer_s32': Variant(MlpMixer, _mixer(512, 8, 32), 'mixer_s32_224'),
    'mixer_s16': Variant(MlpMixer, _mixer(512, 8, 16), 'mixer_s16_224'),
    'mixer_s8': Variant(MlpMixer, _mixer(512, 8, 8), None),
    'mixer_b32': Variant(MlpMixer, _mixer(768, 12, 32), 'mixer_b32_224'),
    'mixer_b16': Variant(MlpMixer, _mixer(768, 12, 16), 'mixer_b16_224'),
    'mixer_l32': Variant(MlpMixer, _mixer(1024, 24, 32), 'mixer_l32_224'),
    'mixer_l16': Variant(MlpMixer, _mixer(1024, 24, 16), 'mixer_l16_224'),
    'mixer_h14': Variant(MlpMixer, _mixer(1280, 32, 14), None),
    'convmixer_1536_20': Variant(ConvMixer, dict(dim=1536, depth=20, kernel_size=9, patch_size=7),
                                 'convmixer_1536_20'),
    # The released 768/32 checkpoint was trained with ReLU (the official repo's GELU definition is wrong for it).
    'convmixer_768_32': Variant(ConvMixer, dict(dim=768, depth=32, kernel_size=7, patch_size=7, act='relu'),
                                'convmixer_768_32'),
    'convmixer_1024_20_p14': Variant(ConvMixer, dict(dim=1024, depth=20, kernel_size=9, patch_size=14),
                                     'convmixer_1024_20_ks9_p14'),
    'convmixer_256_8': Variant(ConvMixer, dict(dim=256, depth=8, kernel_size=5, patch_size=2, image_size=32),
                               None),
    'davit_tiny': Variant(DaViT, _davit((96, 192, 384, 768), (1, 1, 3, 1)), 'davit_tiny'),
    'davit_small': Variant(DaViT, _davit((96, 192, 384, 768), (1, 1, 9, 1)), 'davit_small'),
    'davit_base': Variant(DaViT, _davit((128, 256, 512, 1024), (1, 1, 9, 1)), 'davit_base'),
    'davit_large': Variant(DaViT, _davit((192, 384, 768, 1536), (1, 1, 9, 1)), 'davit_large'),
    'davit_huge': Variant(DaViT, _davit((256, 512, 1024, 2048), (1, 1, 9, 1)), 'davit_huge'),
    'davit_giant': Variant(DaViT, _davit((384, 768, 1536, 3072), (1, 1, 12, 3)), 'davit_giant'),
}


# The modules whose identical blocks `scan_blocks=True` runs as one nn.scan (layers.scan_blocks), and the name the
# blocks' stacked variables take (leading axis = block). Checkpoints, converters and the fine-tuning merge only
# ever see the published per-block layout (`{block}_0` ... `{block}_{L-1}`): the stacked one lives in a train
# state, entered through `stack_blocks` and left through `unstack_blocks`.
SCANNED_BLOCKS = {MlpMixer: 'MixerBlock', ConvMixer: 'ConvMixerBlock'}


def names() -> list[str]:
  return list(VARIANTS)


def variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(VARIANTS)}')
  return VARIANTS[name]


def family(name: str) -> str:
  """'mixer', 'convmixer' or 'davit'."""
  return {MlpMixer: 'mixer', ConvMixer: 'convmixer', DaViT: 'davit'}[variant(name).module]


def options(name: str) -> list[str]:
  """The fields `create` accepts as overrides for this model."""
  fields = dataclasses.fields(variant(name).module)
  return [f.name for f in fields if f.name not in ('parent', 'name', 'num_classes')]


def describe(name: str, options: dict) -> str:
  """What model `name` built with `options` is: its name, and the architecture `options` that differ from the
  registered variant's (e.g. the quickstart's small Mixer, "mixer_s16 with patch_size=7, hidden_dim=128, ...");
  options that only change how it runs (RUN_OPTIONS) are left out."""
  defaults = {f.name: f.default for f in dataclasses.fields(variant(name).module)} | variant(name).kwargs
  changed = [f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}' for k, v in sorted(options.items())
             if k not in RUN_OPTIONS and k in defaults and v != defaults[k]
             and not (isinstance(v, (list, tuple)) and tuple(v) == defaults[k])]
  return f'{name} with {", ".join(changed)}' if changed else name


def create(name: str, *, num_classes: int | None, platform: str | None = None, **overrides) -> nn.Module:
  """Builds the registered variant `name` with a `num_classes` head (0 or None: no head) for `platform`."""
  v = variant(name)
  unknown = sorted(set(overrides) - set(options(name)))
  if unknown:
    raise ValueError(f'{name} has no option {", ".join(map(repr, unknown))}; options: {", ".join(options(name))}')
  if 'depthwise' in options(name) and overrides.get('depthwise', 'auto') == 'auto':
    overrides['depthwise'] = layers.depthwise_impl(platform or jax.default_backend())
  for key in ('dtype', 'param_dtype'):
    if isinstance(overrides.get(key), str):
      if overrides[key] not in DTYPES:
        raise ValueError(f'{name}: {key} {overrides[key]!r} is not one of {DTYPES}')
      overrides[key] = jnp.dtype(overrides[key])
  return v.module(num_classes=num_classes, **{**v.kwargs, **overrides})


def input_shape(model: nn.Module, batch_size: int = 1) -> tuple[int, int, int, int]:
  return (batch_size, *pair(model.image_size), model.in_channels)


def init_boxed(model: nn.Module, rng: jax.Array, batch_size: int = 1):
  """Variables with parameters still wrapped in `nn.LogicallyPartitioned` (their logical axis names)."""
  return model.init(rng, jnp.zeros(input_shape(model, batch_size), model.dtype), train=False)


def init_variables(model: nn.Module, rng: jax.Array, batch_size: int = 1):
  """Plain variables {'params': ..., ['batch_stats': ...]} at the model's `image_size`."""
  return nn.meta.unbox(jax.jit(lambda rng: init_boxed(model, rng, batch_size))(rng))


def abstract_variables(model: nn.Module):
  """The variables' shapes and dtypes (`jax.ShapeDtypeStruct` leaves), without allocating or computing them."""
  return nn.meta.unbox(jax.eval_shape(lambda rng: init_boxed(model, rng), jax.random.key(0)))


def logical_axes(model: nn.Module):
  """A tree like the variables holding each parameter's `PartitionSpec` of logical axis names.

  Leaves without names (BatchNorm running statistics) get an empty spec, i.e. replicated.
  """
  return nn.get_partition_spec(jax.eval_shape(lambda rng: init_boxed(model, rng), jax.random.key(0)))


def per_block(model: nn.Module) -> nn.Module:
  """`model` with the published per-block variables: the same module without `scan_blocks`."""
  return model.clone(scan_blocks=False) if getattr(model, 'scan_blocks', False) else model


def _numbered(collection: dict, block: str) -> list[str]:
  keys = [k for k in collection if re.fullmatch(rf'{block}_\d+', k)]
  return sorted(keys, key=lambda k: int(k.rsplit('_', 1)[1]))


def stack_blocks(variables: dict, model: nn.Module) -> dict:
  """Per-block variables -> `model`'s own layout: each collection's `{block}_{i}` stacked into `{block}` (axis 0
  = i) when it scans its blocks; as they are otherwise."""
  if not getattr(model, 'scan_blocks', False):
    return variables
  block = SCANNED_BLOCKS[type(model)]
  out = {}
  for collection, tree in variables.items():
    keys = _numbered(tree, block)
    if keys != [f'{block}_{i}' for i in range(len(keys))]:
      raise ValueError(f'{collection}: blocks {", ".join(keys)} are not {block}_0 ... {block}_{len(keys) - 1}')
    rest = {k: v for k, v in tree.items() if k not in keys}
    if keys:
      rest[block] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *(tree[k] for k in keys))
    out[collection] = rest
  return out


def unstack_blocks(variables: dict, name: str) -> dict:
  """Variables of model `name` in either layout -> the per-block one (numpy where blocks were split)."""
  block = SCANNED_BLOCKS.get(variant(name).module)
  out = {}
  for collection, tree in variables.items():
    out[collection] = tree = dict(tree)
    if block in tree:
      stacked = tree.pop(block)
      for i in range(np.shape(jax.tree.leaves(stacked)[0])[0]):
        tree[f'{block}_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return out


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
