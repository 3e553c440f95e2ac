"""MLP-Mixer (Tolstikhin et al., 2021) with Google's parameter tree.

The module and parameter names are byte-identical to vit_jax/big_vision (`stem`, `MixerBlock_{i}/{LayerNorm_0,
token_mixing,LayerNorm_1,channel_mixing}/Dense_{0,1}`, `pre_head_layer_norm`, `head`), so an official
`gs://mixer_models/*.npz` loads by unflattening its keys. Defaults reproduce the official model: LayerNorm eps
1e-6, tanh-approximated GELU (`act='gelu'` gives the exact GELU of timm's weights), zero-initialised head.

Stochastic depth follows big_vision: block i drops each of its two branches with probability
`i / max(L - 1, 1) * stoch_depth`, per example, without the 1/(1-p) rescale of timm's DropPath.

The token-mixing MLP acts on the token axis, so its width depends on the number of patches: a Mixer is built
for one `image_size`. Other resolutions need the checkpoint surgery in `mixer_jax.convert`.

Layout: tokens are (B, S, C) and token mixing is a dense layer between two swapaxes, as in Google's code. A
token-major (S, B, C) layout with a hand-written gradient (no transposes in the HLO) was tried and removed:
compiled for TPU v3 it moved more bytes (eval step 5.9 vs 2.6 ms of HBM time per step, train 12.3 vs 10.7 GB)
and held more temporaries (1.29 vs 0.96 GiB), as XLA:TPU folds the swapaxes into its matmul layouts
(BENCHMARKS.md, "TPU: tuning").
"""
import functools
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from mixer_jax.models import layers

LN_EPS = 1e-6


class MixerBlock(nn.Module):
  tokens_mlp_dim: int
  channels_mlp_dim: int
  act: str
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, train: bool, drop_p=None):
    """x: tokens (B, S, C); drop_p: this block's stochastic depth rate (a scalar array when scanned, None for
    none: remat turns even a Python 0.0 into an array, which would draw from the 'dropout' RNG)."""
    mlp = dict(act=self.act, dtype=self.dtype, param_dtype=self.param_dtype)
    drop = dict(train=train, module=self, scale_by_keep=False)
    y = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = layers.MlpBlock(self.tokens_mlp_dim, ('tokens', 'token_mlp'), name='token_mixing', **mlp)(y)
    y = jnp.swapaxes(y, 1, 2)
    x = x + layers.drop_path(y, drop_p, **drop)
    y = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype)(x)
    y = layers.MlpBlock(self.channels_mlp_dim, ('embed', 'mlp'), name='channel_mixing', **mlp)(y)
    return x + layers.drop_path(y, drop_p, **drop)


class MlpMixer(nn.Module):
  """`__call__(images, *, train)` -> (logits, out); images NHWC in [-1, 1] of size `image_size`."""
  num_classes: int | None
  patch_size: int
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  image_size: Any = 224
  in_channels: int = 3
  act: str = 'gelu_tanh'
  stoch_depth: float = 0.0
  remat: bool | str = False  # recompute block activations in the backward pass: True or a layers.REMAT_POLICIES name
  scan_blocks: bool = False  # one nn.scan over the blocks: compiles one block; parameters stacked (SCANNED_BLOCKS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_input(self, images):
    h, w = images.shape[1:3]
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not divisible by the Mixer patch size {p}: '
                       f'resize or crop to a multiple of {p}')
    if (h, w) != layers.pair(self.image_size):
      eh, ew = layers.pair(self.image_size)
      raise ValueError(
          f'this Mixer is built for {eh}x{ew} images ({eh // p * ew // p} tokens) but got {h}x{w} '
          f'({h // p * w // p} tokens): create it with image_size=({h}, {w}) and resize pre-trained weights with '
          'mixer_jax.convert')

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    layers.check_channels(images, self.in_channels, 'MlpMixer')
    self._check_input(images)
    out = {}
    x = layers.conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                    in_features=images.shape[-1], kernel_init=nn.linear.default_kernel_init,
                    bias_init=layers.zeros, dtype=self.dtype, param_dtype=self.param_dtype, name='stem')(images)
    out['stem'] = x
    x = out['input_tokens'] = x.reshape(x.shape[0], -1, x.shape[-1])  # row-major over the patch grid
    block = functools.partial(layers.maybe_remat(MixerBlock, self.remat), self.tokens_mlp_dim,
                              self.channels_mlp_dim, self.act, dtype=self.dtype, param_dtype=self.param_dtype)
    rates = [i / max(self.num_blocks - 1, 1) * self.stoch_depth or None for i in range(self.num_blocks)]
    if self.scan_blocks:  # no per-block `out` entries
      per_block = (jnp.asarray([r or 0.0 for r in rates], jnp.float32),) if self.stoch_depth else ()
      x = layers.scan_blocks(block(name='MixerBlock'), x, train, self.num_blocks, *per_block)
    for i in range(0 if self.scan_blocks else self.num_blocks):
      x = out[f'block_{i}'] = block(name=f'MixerBlock_{i}')(x, train, rates[i])
    x = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name='pre_head_layer_norm')(x)
    x = out['pre_logits'] = jnp.mean(x, axis=1)
    if self.num_classes:
      x = layers.dense(self.num_classes, ('embed', 'classes'), kernel_init=layers.zeros, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='head')(x)
    x = out['logits'] = x.astype(jnp.float32)
    return x, out
