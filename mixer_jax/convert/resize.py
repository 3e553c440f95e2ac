"""Mixer checkpoints at another resolution: the token-mixing surgery of the MLP-Mixer paper (Appendix C).

A Mixer's token-mixing MLP acts on the token axis, so its weights fix the number of patches S. This module owns
the functions that turn a Mixer `params` tree pre-trained on an (h, w) grid of patches into one for another
grid, with the patch size unchanged. It only rewrites the token-mixing `Dense_0`/`Dense_1` of every
`MixerBlock_{i}`; the stem, norms, channel mixing and head are returned untouched. It does not build models or
read checkpoints: the caller creates the new model with the returned `tokens_mlp_dim`.

**Paper method (default, `method='blocks'`).** When the grid grows by an integer factor K on both sides
(S' = K²·S), the image is split into K×K equal parts and the token sequence is treated as the K² per-part
sequences of length S. The new token MLP has hidden width D_S' = K²·D_S and is initialised block-diagonally
from K² copies of the pre-trained weights (biases tiled); all entries, the zeros off the diagonal included, stay
trainable. At the start of fine-tuning every part is therefore mixed exactly as a pre-training image was: an
image tiled from K×K pre-training-size images gets the mean of their pre-trained logits (tests/test_resize.py).

**Grouping option (`method='strided'`).** Same expansion, but group p = (i, j) is the sub-grid of patches
(K·a + i, K·b + j): each group spans the whole image at 1/K of the patch density, instead of covering one
contiguous part. Not the paper's choice; offered for experiments where each group should see global context.

**Folding the permutation into the weights.** The paper's "sequence of parts" is a permutation Π of the model's
row-major tokens. Rather than permuting activations (a model change), the block-diagonal weights are scattered
to the row-major positions: with part(t') and local(t') from `token_groups`,
`Dense_0.kernel'[t', part·D_S + h] = Dense_0.kernel[local, h]`, `Dense_1.kernel'[part·D_S + h, t'] =
Dense_1.kernel[h, local]`, `Dense_1.bias'[t'] = Dense_1.bias[local]`, zero elsewhere, and `Dense_0.bias'` is
`Dense_0.bias` tiled K² times. The result loads into a plain `MlpMixer(image_size=new, tokens_mlp_dim=K²·D_S)`.

**Non-integer ratios.** Refused with a `ValueError` naming both grids, unless the caller asks for
`method='interpolate'`: an explicitly non-paper bilinear resampling of the token axis that keeps D_S (see
`interpolate_token_mixing`).

Usage (what fine-tuning does when the config's resolution differs from the checkpoint's):
`grid, _ = mixer_token_grid(params, checkpoint_image_size)`, then
`params, d_s = resize_mixer(params, old_grid=grid, new_grid=(H // P, W // P), method=...)`, then
`models.create(name, image_size=(H, W), tokens_mlp_dim=d_s, ...)`.

ConvMixer and DaViT need none of this: their parameters do not depend on the resolution.

All functions are pure and traceable (index arithmetic in numpy, weights through jax.numpy), so they also run
under `jax.eval_shape` on abstract trees.
"""
import math
from typing import Any, Mapping, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from mixer_jax.models.layers import pair

Grid = tuple[int, int]
GROUPINGS = ('blocks', 'strided')
METHODS = (*GROUPINGS, 'interpolate')


def _fmt(grid: Grid) -> str:
  return f'{grid[0]}x{grid[1]}'


def scale_factor(old_grid: int | Sequence[int], new_grid: int | Sequence[int]) -> int:
  """The integer K with new_grid = K·old_grid on both sides; ValueError naming both grids otherwise."""
  (h, w), (nh, nw) = pair(old_grid), pair(new_grid)
  if nh % h == 0 and nw % w == 0 and nh // h == nw // w:
    return nh // h
  ratio = f'ratio {nh / h:g}' if nh * w == nw * h else f'ratios {nh / h:g} and {nw / w:g}'
  raise ValueError(
      f'cannot expand the {_fmt((h, w))} token grid to {_fmt((nh, nw))} ({ratio}): the paper\'s block-diagonal '
      "expansion needs the same integer factor on both sides; use method='interpolate' for a non-paper "
      'resampling')


def token_groups(old_grid, new_grid, grouping: str = 'blocks') -> tuple[np.ndarray, np.ndarray]:
  """(part, local): for every row-major token t' of `new_grid`, its group in [0, K²) and its index in [0, S).

  `local` is the row-major index inside the group's own old-sized grid, i.e. the pre-trained token it plays.
  'blocks' (paper): K×K contiguous parts. 'strided': group (r' % K, c' % K), a sub-grid spanning the image.
  """
  if grouping not in GROUPINGS:
    raise ValueError(f'unknown token grouping {grouping!r}; choose one of {", ".join(GROUPINGS)}')
  k = scale_factor(old_grid, new_grid)
  gh, gw = pair(old_grid)
  r, c = np.divmod(np.arange(k * gh * k * gw), k * gw)  # row and column of each row-major new token
  if grouping == 'blocks':
    return (r // gh) * k + c // gw, (r % gh) * gw + c % gw
  return (r % k) * k + c % k, (r // k) * gw + c // k


def _mixer_blocks(params: Mapping[str, Any]) -> list[str]:
  names = sorted((n for n in params if n.startswith('MixerBlock_')), key=lambda n: int(n.split('_')[-1]))
  if not names:
    raise ValueError("not a Mixer params tree (no MixerBlock_{i}): pass variables['params'] of an MlpMixer")
  return names


def _token_mlp_shape(params) -> tuple[int, int]:
  """(S, D_S) of the token-mixing MLPs: Dense_0 maps the S tokens to D_S hidden units."""
  tokens, width = params[_mixer_blocks(params)[0]]['token_mixing']['Dense_0']['kernel'].shape
  return tokens, width


def _check_old_grid(params, old_grid: Grid):
  tokens = _token_mlp_shape(params)[0]
  if tokens != old_grid[0] * old_grid[1]:
    raise ValueError(f'the checkpoint\'s token-mixing MLP has {tokens} tokens but old_grid {_fmt(old_grid)} has '
                     f'{old_grid[0] * old_grid[1]}')


def _replace_token_mixing(params, old_grid: Grid, resize_mlp) -> dict:
  """`params` with every block's token_mixing replaced by `resize_mlp(token_mixing)`; other entries shared."""
  _check_old_grid(params, old_grid)
  return {**params, **{name: {**params[name], 'token_mixing': resize_mlp(params[name]['token_mixing'])}
                       for name in _mixer_blocks(params)}}


def _block_diagonal(kernel: jax.Array, part: np.ndarray, local: np.ndarray, num_parts: int) -> jax.Array:
  """(S, D) token-major kernel -> (S', num_parts·D): row t' holds kernel[local(t')] in column block part(t')."""
  tokens = np.arange(len(part))
  d = kernel.shape[1]
  expanded = jnp.zeros((len(part), num_parts, d), kernel.dtype).at[tokens, part].set(kernel[local])
  return expanded.reshape(len(part), num_parts * d)


def expand_token_mixing(params, old_grid, new_grid, grouping: str = 'blocks') -> dict:
  """The paper's K²-fold block-diagonal token-mixing MLPs for a K-times larger grid (hidden width K²·D_S).

  Exact at initialisation: each group of tokens (see `token_groups`) is mixed as in pre-training.
  """
  part, local = token_groups(old_grid, new_grid, grouping)
  num_parts = scale_factor(old_grid, new_grid) ** 2

  def expand(mlp):
    dense_0, dense_1 = mlp['Dense_0'], mlp['Dense_1']
    return {
        'Dense_0': {'kernel': _block_diagonal(dense_0['kernel'], part, local, num_parts),
                    'bias': jnp.tile(dense_0['bias'], num_parts)},
        # Dense_1 maps hidden -> tokens: the same construction on its (tokens, hidden) transpose.
        'Dense_1': {'kernel': _block_diagonal(dense_1['kernel'].T, part, local, num_parts).T,
                    'bias': dense_1['bias'][local]},
    }

  return _replace_token_mixing(params, pair(old_grid), expand)


def interpolate_token_mixing(params, old_grid, new_grid) -> dict:
  """NOT the paper's method: bilinear resampling of the token axis to any grid, D_S unchanged.

  Dense_0 kernel rows, Dense_1 kernel columns and Dense_1 bias are treated as images over the patch grid and
  resized (`jax.image.resize`, bilinear). Dense_0 sums over tokens, so its kernel is also scaled by S/S' to keep
  the hidden pre-activations of a spatially smooth input at their pre-training scale. This does NOT preserve
  the pre-trained function (no input at the new size reproduces the old logits); it is a starting point for
  fine-tuning when the resolution ratio is not an integer, offered only as an explicit opt-in.
  """
  old_grid, new_grid = pair(old_grid), pair(new_grid)
  tokens_ratio = (old_grid[0] * old_grid[1]) / (new_grid[0] * new_grid[1])

  def resample(x, token_axis):
    """x with its token axis, viewed as the 2-D patch grid, resized to `new_grid`."""
    x = jnp.moveaxis(x, token_axis, 0)
    rest = x.shape[1:]
    out = jax.image.resize(x.reshape(*old_grid, *rest), (*new_grid, *rest), method='bilinear')
    return jnp.moveaxis(out.reshape(-1, *rest), 0, token_axis).astype(x.dtype)

  def interpolate(mlp):
    dense_0, dense_1 = mlp['Dense_0'], mlp['Dense_1']
    kernel_0 = resample(dense_0['kernel'], 0)
    return {
        'Dense_0': {'kernel': kernel_0 * jnp.asarray(tokens_ratio, kernel_0.dtype), 'bias': dense_0['bias']},
        'Dense_1': {'kernel': resample(dense_1['kernel'], 1), 'bias': resample(dense_1['bias'], 0)},
    }

  return _replace_token_mixing(params, old_grid, interpolate)


def mixer_token_grid(params, image_size: int | Sequence[int] | None = None) -> tuple[Grid, int]:
  """(token grid (rows, cols), tokens_mlp_dim D_S) of a Mixer params tree.

  S is read from the token-mixing kernel and a square grid inferred from it. Pass the checkpoint's
  `image_size` when its grid is not square (the patch size is read from the stem kernel).
  """
  tokens, width = _token_mlp_shape(params)
  if image_size is None:
    side = math.isqrt(tokens)
    if side * side != tokens:
      raise ValueError(f'the {tokens} tokens of this Mixer do not form a square grid: pass its image_size')
    return (side, side), width
  (h, w), (ph, pw) = pair(image_size), params['stem']['kernel'].shape[:2]
  grid = (h // ph, w // pw)
  if h % ph or w % pw or grid[0] * grid[1] != tokens:
    raise ValueError(f'image size {h}x{w} with {ph}x{pw} patches does not give the {tokens} tokens of this Mixer')
  return grid, width


def resize_mixer(params, *, old_grid, new_grid, method: str = 'blocks') -> tuple[dict, int]:
  """(params for `new_grid`, the new model's tokens_mlp_dim): fine-tuning a Mixer checkpoint at another resolution.

  method: 'blocks' (default, the paper's K×K parts), 'strided' (K² interleaved sub-grids) or 'interpolate'
  (non-paper bilinear resampling, any ratio, D_S kept). Equal grids return `params` unchanged.
  """
  if method not in METHODS:
    raise ValueError(f'unknown resize method {method!r}; choose one of {", ".join(METHODS)}')
  old_grid, new_grid = pair(old_grid), pair(new_grid)
  _check_old_grid(params, old_grid)
  width = _token_mlp_shape(params)[1]
  if old_grid == new_grid:
    return params, width
  if method == 'interpolate':
    return interpolate_token_mixing(params, old_grid, new_grid), width
  k = scale_factor(old_grid, new_grid)
  return expand_token_mixing(params, old_grid, new_grid, method), k * k * width
