"""DaViT: Dual Attention Vision Transformers (Ding et al., 2022), as the official code and timm compute it.

Four stages; each stage is `depth` pairs of a spatial block (window attention) followed by a channel block
(channel group attention). Every block: `x += cpe1(x)`, `x += attn(norm1(x))`, `x += cpe2(x)`,
`x += mlp(norm2(x))`, where `cpe` is a depthwise 3x3 convolution (the conditional positional encoding; there is
no relative position bias, window shift or mask). LayerNorm eps 1e-5 everywhere; head: pool -> norm -> dense.

Any input size works without changing parameters: the image is padded right/bottom to a multiple of the stem
stride, each downsample pads to an even size, and window attention pads its normalised tokens to a multiple of
the window (padded tokens are unmasked keys, as in the reference) and crops the result.

Channel attention is the code's formula, not the paper's naming: softmax(scale * k^T v) applied to q, with
scale = head_dim^-0.5 and q/k/v the [0:C]/[C:2C]/[2C:3C] slices of one qkv projection (dingmyu/davit's
`ChannelAttention`, timm's `davit.py`).

Drop path uses the official per-attention-block schedule: linspace(0, drop_path_rate, 2 * sum(depths)), entry
2b for the spatial and 2b+1 for the channel block of the b-th pair, rescaled by 1/(1-p) like timm's DropPath.
"""
from typing import Any, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from mixer_jax.models import layers

LN_EPS = 1e-5
STEM_STRIDE = 4


def pad_bottom_right(x, multiple_h: int, multiple_w: int):
  """Zero-pad an NHWC array at the bottom/right up to multiples of the given sizes."""
  h, w = x.shape[1:3]
  pad_h, pad_w = -h % multiple_h, -w % multiple_w
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x


def split_heads(qkv, num_heads: int):
  """(..., 3C) -> q, k, v, each (..., heads, C/heads), split as the slices [0:C], [C:2C], [2C:3C]."""
  qkv = qkv.reshape(qkv.shape[:-1] + (3, num_heads, -1))
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
  """The official per-attention-block schedule: entry 2b (spatial) and 2b+1 (channel) for the b-th pair."""
  return np.linspace(0.0, rate, 2 * sum(depths)).tolist()


class WindowAttention(nn.Module):
  """Multi-head self-attention inside non-overlapping window_size x window_size windows."""
  num_heads: int
  window_size: int
  implementation: str | None
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    ws = self.window_size
    x = pad_bottom_right(x, ws, ws)
    hp, wp = x.shape[1:3]
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    kw = dict(kernel_init=layers.trunc_normal_02, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = split_heads(layers.dense(3 * c, ('embed', 'heads'), name='qkv', **kw)(x), self.num_heads)
    # softmax(q.k^T * head_dim^-0.5).v with float32 logits and softmax; on GPUs cuDNN's fused attention where
    # it applies (bfloat16/float16), XLA's einsum-softmax-einsum elsewhere
    y = jax.nn.dot_product_attention(q, k, v, scale=(c // self.num_heads) ** -0.5,
                                     implementation=self.implementation).reshape(-1, ws * ws, c)
    y = layers.dense(c, ('heads', 'embed'), name='proj', **kw)(y)
    y = y.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return y[:, :h, :w, :]


class ChannelAttention(nn.Module):
  """Channel group attention: each head attends over its C/heads channels, with all tokens as the sequence."""
  num_heads: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    kw = dict(kernel_init=layers.trunc_normal_02, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = split_heads(layers.dense(3 * c, ('embed', 'heads'), name='qkv', **kw)(x), self.num_heads)
    k = k * (c // self.num_heads) ** -0.5
    logits = jnp.einsum('bngi,bngj->bgij', k, v, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    y = jnp.einsum('bgij,bngj->bngi', probs, q).reshape(b, h * w, c)
    y = layers.dense(c, ('heads', 'embed'), name='proj', **kw)(y)
    return y.reshape(b, h, w, c)


class AttentionBlock(nn.Module):
  """A spatial (`attention='window'`) or channel (`'channel'`) block with its two CPEs and MLP."""
  attention: str
  num_heads: int
  window_size: int
  mlp_ratio: float
  drop_path: float
  act: str
  depthwise: str
  attention_impl: str | None
  dtype: Any
  param_dtype: Any

  def cpe(self, x, name):
    return x + layers.DepthwiseConv(3, self.dtype, self.param_dtype, self.depthwise, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = self.cpe(x, 'cpe1')
    y = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name='norm1')(x)
    if self.attention == 'window':
      y = WindowAttention(self.num_heads, self.window_size, self.attention_impl, name='window_attention', **kw)(y)
    else:
      y = ChannelAttention(self.num_heads, name='channel_attention', **kw)(y)
    x = x + layers.drop_path(y, self.drop_path, train=train, module=self, scale_by_keep=True)
    x = self.cpe(x, 'cpe2')
    y = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name='norm2')(x)
    y = layers.MlpBlock(int(x.shape[-1] * self.mlp_ratio), ('embed', 'mlp'), self.act,
                        kernel_init=layers.trunc_normal_02, name='mlp', **kw)(y)
    return x + layers.drop_path(y, self.drop_path, train=train, module=self, scale_by_keep=True)


class DaViT(nn.Module):
  """`__call__(images, *, train)` -> (logits, out); images NHWC, ImageNet mean/std normalised, any size."""
  num_classes: int | None
  dims: Sequence[int]
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  act: str = 'gelu'
  depthwise: str = 'conv'  # CPE convolution form, see layers.DepthwiseConv ('auto' in models.create)
  attention_impl: str | None = None  # window attention: None (cuDNN where it applies, else XLA), 'xla', 'cudnn'
  remat: bool | str = False  # recompute block activations in the backward pass: True or a layers.REMAT_POLICIES name
  image_size: Any = 224  # the default input size (for init and benchmarks); any size works
  in_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    layers.check_channels(images, self.in_channels, 'DaViT')
    if self.attention_impl not in (None, 'xla', 'cudnn'):
      raise ValueError(f"DaViT attention_impl {self.attention_impl!r}: use None (automatic), 'xla' or 'cudnn'")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rates = drop_path_rates(self.depths, self.drop_path_rate)
    out = {}
    x = pad_bottom_right(images, STEM_STRIDE, STEM_STRIDE)
    x = layers.conv(self.dims[0], (7, 7), strides=(STEM_STRIDE,) * 2, padding=((3, 3), (3, 3)),
                    in_features=images.shape[-1], name='stem', **kw)(x)
    x = out['stem'] = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name='stem_norm')(x)
    block = layers.maybe_remat(AttentionBlock, self.remat)
    pair_index = 0
    for s, (dim, depth, heads) in enumerate(zip(self.dims, self.depths, self.num_heads)):
      if s > 0:
        x = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name=f'stage_{s}_downsample_norm')(x)
        x = layers.conv(dim, (2, 2), strides=(2, 2), in_features=x.shape[-1], name=f'stage_{s}_downsample',
                        **kw)(pad_bottom_right(x, 2, 2))
      for j in range(depth):
        for t, attention in enumerate(('window', 'channel')):
          kind = 'spatial' if attention == 'window' else 'channel'
          x = block(attention, heads, self.window_size, self.mlp_ratio, rates[2 * pair_index + t], self.act,
                    self.depthwise, self.attention_impl, name=f'stage_{s}_{kind}_block_{j}', **kw)(x, train)
        pair_index += 1
      out[f'stage_{s}'] = x
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = out['pre_logits'] = layers.layer_norm(LN_EPS, param_dtype=self.param_dtype, name='head_norm')(x)
    if self.num_classes:
      x = layers.dense(self.num_classes, ('embed', 'classes'), kernel_init=layers.trunc_normal_02,
                       name='head', **kw)(x)
    x = out['logits'] = x.astype(jnp.float32)
    return x, out
