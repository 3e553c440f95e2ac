"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter), as the official code and timm compute it.

Order conv -> activation -> BatchNorm everywhere (the norm comes *after* the activation); the residual wraps only
the depthwise half of a block; no final norm, no drop path. Exact GELU, except the released 768/32 checkpoint,
which was trained with ReLU. BatchNorm: eps 1e-5, torch momentum 0.1, running statistics in the `batch_stats`
collection (call with `train=True, mutable=['batch_stats']` to train); training statistics over the global batch
or, with `bn_group_size`, per group of examples as the authors' per-GPU BatchNorm. Initialisation is PyTorch's
default, as in the reference (the head is not zero-initialised).

Fully convolutional: any input size of at least one patch works with the same parameters. The stem is a
strided 'VALID' convolution, as timm's and the official `nn.Conv2d(kernel_size=p, stride=p)`: the patch grid is
floor(H/p) x floor(W/p) and the bottom and right remainder pixels are dropped, so timm's logits are matched at
sizes the patch does not divide too.
"""
import functools
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from mixer_jax.models import layers


class ConvMixerBlock(nn.Module):
  kernel_size: int
  act: str
  depthwise: str
  bn_group_size: int | None
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    dim = x.shape[-1]
    act = layers.activation(self.act)
    kw = dict(in_features=dim, dtype=self.dtype, param_dtype=self.param_dtype)
    bn = dict(train=train, param_dtype=self.param_dtype, group_size=self.bn_group_size)
    y = layers.DepthwiseConv(self.kernel_size, self.dtype, self.param_dtype, self.depthwise, name='depthwise')(x)
    x = x + layers.batch_norm(name='depthwise_norm', **bn)(act(y))
    y = layers.conv(dim, (1, 1), name='pointwise', **kw)(x)
    return layers.batch_norm(name='pointwise_norm', **bn)(act(y))


class ConvMixer(nn.Module):
  """`__call__(images, *, train)` -> (logits, out); images NHWC, ImageNet mean/std normalised."""
  num_classes: int | None
  dim: int
  depth: int
  kernel_size: int
  patch_size: int
  act: str = 'gelu'
  # BatchNorm training statistics: None over the whole (global) batch; G over each group of G consecutive
  # examples, as PyTorch's per-GPU BatchNorm on G images (running statistics averaged as timm's --dist-bn
  # reduce), see layers.GroupBatchNorm. G must divide the batch (each micro-batch under accumulation).
  bn_group_size: int | None = None
  depthwise: str = 'conv'  # depthwise convolution form, see layers.DepthwiseConv ('auto' in models.create)
  remat: bool | str = False  # recompute block activations in the backward pass: True or a layers.REMAT_POLICIES name
  scan_blocks: bool = False  # one nn.scan over the blocks: compiles one block; variables stacked (SCANNED_BLOCKS)
  image_size: Any = 224  # the default input size (for init and benchmarks); any size >= the patch works
  in_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    layers.check_channels(images, self.in_channels, 'ConvMixer')
    h, w = images.shape[1:3]
    p = self.patch_size
    if h < p or w < p:  # an empty patch grid would average to NaN logits
      raise ValueError(f'image size {h}x{w} is smaller than one ConvMixer patch ({p}x{p})')
    act = layers.activation(self.act)
    out = {}
    x = layers.conv(self.dim, (p, p), strides=(p, p), in_features=images.shape[-1], dtype=self.dtype,
                    param_dtype=self.param_dtype, name='stem')(images)
    x = out['stem'] = layers.batch_norm(train=train, param_dtype=self.param_dtype, group_size=self.bn_group_size,
                                        name='stem_norm')(act(x))
    block = functools.partial(layers.maybe_remat(ConvMixerBlock, self.remat), self.kernel_size, self.act,
                              self.depthwise, self.bn_group_size, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_blocks:  # no per-block `out` entries
      x = layers.scan_blocks(block(name='ConvMixerBlock'), x, train, self.depth)
    for i in range(0 if self.scan_blocks else self.depth):
      x = out[f'block_{i}'] = block(name=f'ConvMixerBlock_{i}')(x, train)
    x = out['pre_logits'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes:
      x = layers.dense(self.num_classes, ('embed', 'classes'), kernel_init=layers.torch_kernel_init,
                       bias_init=layers.torch_bias_init(self.dim), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='head')(x)
    x = out['logits'] = x.astype(jnp.float32)
    return x, out
