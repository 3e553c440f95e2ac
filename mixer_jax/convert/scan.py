"""The scanned layout (`scan_blocks=True`) <-> the published per-block layout of the same variables.

A model built with `scan_blocks=True` runs its identical blocks as one `nn.scan` (`layers.scan_blocks`): the
variables of `MixerBlock_0` ... `MixerBlock_{L-1}` become one `MixerBlock` whose arrays have a leading axis of
size L (`ConvMixerBlock_{i}` likewise, `batch_stats` included). Every checkpoint format, converter and the
fine-tuning surgery work on the per-block layout; `stack` and `unstack` move between the two, so official
checkpoints load into a scanned model and a scanned run exports the official layout.
"""
import re

import jax
import numpy as np

from mixer_jax import models

BLOCKS = {'mixer': 'MixerBlock', 'convmixer': 'ConvMixerBlock'}  # the families with identical blocks


def block_name(name: str) -> str:
  family = models.family(name)
  if family not in BLOCKS:
    raise ValueError(f'scan_blocks: {name} is a {family}, whose blocks differ; only '
                     f'{" and ".join(BLOCKS)} models scan their blocks')
  return BLOCKS[family]


def _numbered(collection: dict, block: str) -> list[str]:
  keys = [k for k in collection if re.fullmatch(rf'{block}_\d+', k)]
  return sorted(keys, key=lambda k: int(k.rsplit('_', 1)[1]))


def stack(variables: dict, name: str) -> dict:
  """Per-block variables of model `name` -> the scanned layout (`{block}_{i}` -> `{block}`, axis 0 = i)."""
  block = block_name(name)
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


def unstack(variables: dict, name: str) -> dict:
  """The scanned layout -> per-block variables; per-block variables (any family) are returned as they are."""
  block = BLOCKS.get(models.family(name))
  out = {}
  for collection, tree in variables.items():
    out[collection] = tree = dict(tree)
    if block in tree:
      stacked = tree.pop(block)
      for i in range(len(np.asarray(jax.tree.leaves(stacked)[0]))):
        tree[f'{block}_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return out
