"""Building blocks shared by several model families.

Owns: parameter declaration with logical axis names (every parameter of every model is created through
`dense`, `conv`, `DepthwiseConv`, `layer_norm` or `batch_norm` here), activations by name, the
two MLP-style blocks, stochastic depth, how blocks are repeated (`maybe_remat` policies, `scan_blocks`), and the
PyTorch-default initialisers the ConvMixer and DaViT references use. It must not know about any particular
family.

Logical axis names (mapped to mesh axes by the sharding rules in the config):
  'embed'     model width of the residual stream (Mixer C, ConvMixer h, DaViT C_s)
  'mlp'       hidden width of an MLP (Mixer D_C, DaViT 4C)
  'tokens'    Mixer token axis S;     'token_mlp'  Mixer token-mixing hidden width D_S
  'heads'     attention output width (q/k/v and heads, DaViT)
  'classes'   classifier outputs
  'conv_height', 'conv_width', 'conv_in'   spatial kernel axes and input channels of a convolution
  'layers'    the stacked block axis of `scan_blocks` (no rule: replicated)
"""
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default Conv2d/Linear bias init, U(+-1/sqrt(fan_in)); flax bias inits never see fan_in."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


_ACTIVATIONS = {
    'gelu': lambda x: nn.gelu(x, approximate=False),  # exact (erf) GELU: PyTorch nn.GELU, timm
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),  # Google's Mixer (flax nn.gelu default)
    'relu': nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def pair(size) -> tuple[int, int]:
  """An int or an (h, w) sequence as (h, w)."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def check_channels(images, expected: int, model: str) -> None:
  if images.shape[-1] != expected:
    raise ValueError(f'{model} was built for {expected}-channel images but got {images.shape[-1]} channels '
                     f'(shape {images.shape}): set in_channels={images.shape[-1]} or convert the images')


def dense(features: int, axes: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype,
          kernel_init: Initializer = nn.linear.default_kernel_init, bias_init: Initializer = zeros,
          name: str | None = None) -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes[-1:]))


def conv(features: int, kernel_size: Sequence[int], *, in_features: int, out_axis: str = 'embed',
         strides: Sequence[int] = (1, 1), padding: Any = 'VALID', dtype: Dtype,
         param_dtype: Dtype, kernel_init: Initializer = torch_kernel_init, bias_init: Initializer | None = None,
         name: str | None = None) -> nn.Conv:
  """A 2-D NHWC convolution with a bias; the bias defaults to PyTorch's fan-in uniform init."""
  if bias_init is None:
    bias_init = torch_bias_init(in_features * kernel_size[0] * kernel_size[1])
  return nn.Conv(
      features, tuple(kernel_size), strides=tuple(strides), padding=padding, dtype=dtype, param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, ('conv_height', 'conv_width', 'conv_in', out_axis)),
      bias_init=nn.with_logical_partitioning(bias_init, (out_axis,)))


DEPTHWISE_IMPLS = ('conv', 'shift')


def depthwise_impl(platform: str) -> str:
  """The depthwise convolution form for a platform ('cpu', 'gpu', 'tpu'): 'shift' on XLA:CPU, whose grouped
  convolution is slow and whose gradient runs as a dense convolution; XLA's grouped convolution elsewhere."""
  return 'shift' if platform == 'cpu' else 'conv'


class DepthwiseConv(nn.Module):
  """A k x k depthwise convolution, stride 1, 'SAME' padding (k//2 on each side for odd k, as PyTorch's
  padding=k//2), with bias. Parameters are those of `nn.Conv(C, (k, k), feature_group_count=C)`.

  `impl='conv'` is XLA's grouped convolution (cuDNN on GPU). `'shift'` computes it as k*k shifted
  multiply-adds accumulated in float32: on XLA:CPU 4-30x faster than the grouped convolution (forward and
  backward) with the same results. `models.create` picks one for the target platform (`depthwise_impl`).
  """
  kernel_size: int
  dtype: Dtype
  param_dtype: Dtype
  impl: str = 'conv'

  @nn.compact
  def __call__(self, x):
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param('kernel', nn.with_logical_partitioning(
        torch_kernel_init, ('conv_height', 'conv_width', 'conv_in', 'embed')), (k, k, 1, c), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(torch_bias_init(k * k), ('embed',)), (c,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = ((k - 1) // 2, k // 2)
    if self.impl == 'conv':
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), (pads, pads), feature_group_count=c,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    elif self.impl == 'shift':
      h, w = x.shape[1:3]
      padded = jnp.pad(x, ((0, 0), pads, pads, (0, 0)))
      y = sum(padded[:, i:i + h, j:j + w, :].astype(jnp.float32) * kernel[i, j, 0].astype(jnp.float32)
              for i in range(k) for j in range(k)).astype(x.dtype)
    else:
      raise ValueError(f"depthwise {self.impl!r}: choose {', '.join(map(repr, DEPTHWISE_IMPLS))} (or 'auto' in "
                       "models.create: the form for the target platform)")
    return y + bias


def layer_norm(epsilon: float, *, param_dtype: Dtype, axis: str = 'embed', name: str | None = None) -> nn.LayerNorm:
  """LayerNorm computed in float32 whatever the compute dtype (statistics of bf16 activations are too coarse)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(ones, (axis,)),
      bias_init=nn.with_logical_partitioning(zeros, (axis,)))


def batch_norm(*, train: bool, param_dtype: Dtype, group_size: int | None = None,
               name: str | None = None) -> nn.Module:
  """PyTorch BatchNorm2d semantics: eps 1e-5, running stats updated with torch momentum 0.1 (flax 0.9).

  group_size None: under `jax.jit` with the batch axis sharded over a mesh, the statistics are those of the
  global batch (flax updates the running variance with the biased batch variance). Otherwise `GroupBatchNorm`:
  per-group statistics, as PyTorch's per-GPU BatchNorm. Both keep the same variables.
  """
  kw = dict(param_dtype=param_dtype, name=name, scale_init=nn.with_logical_partitioning(ones, ('embed',)),
            bias_init=nn.with_logical_partitioning(zeros, ('embed',)))
  if group_size is not None:
    return GroupBatchNorm(group_size, train=train, **kw)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, **kw)


class GroupBatchNorm(nn.Module):
  """BatchNorm over the last axis with training statistics per group of `group_size` consecutive examples: a
  (B, ..., C) batch is viewed as (B/G, G, ..., C) and each group normalised with its own mean and biased
  variance, exactly what PyTorch's BatchNorm2d computes on each GPU's shard of G images under DDP.

  Groups are consecutive along the batch, so with the batch sharded over devices and G dividing the per-device
  batch each group lies on one device and normalising needs no collective; only the running-statistics update
  averages the per-group (C,) vectors across devices (the reduce). Statistics are taken over each example's
  positions first, so where groups straddle devices (20 or 80 images per TPU core in groups of 64) only those
  per-example (B, C) means need to move between devices: over the group view of the activations, the partitioner
  may gather the activations themselves (on 8 CPU devices of 6 examples in groups of 4: 240 KB against 1.5 KB).

  Running statistics: each PyTorch replica i updates r_i <- (1-m) r_i + m s_i with its own batch mean and
  *unbiased* variance s_i (m = 0.1), and timm's `--dist-bn reduce` replaces every r_i by their mean at the end
  of each epoch. The update is linear, so mean_i r_i follows (1-m) mean_i r_i + m mean_i s_i exactly, whatever
  the r_i were: one running value updated every step with the mean over groups of the group means and unbiased
  variances equals timm's reduced statistics at each epoch end. The only difference is timing: ours are the
  reduced value at every step, not only after the epoch's reduce (which timm runs before evaluating and saving).
  Evaluation normalises with the running statistics. Variables are nn.BatchNorm's (params scale, bias;
  batch_stats mean, var, float32), so checkpoints and converters serve both forms.
  """
  group_size: int
  train: bool
  param_dtype: Dtype
  scale_init: Initializer
  bias_init: Initializer
  epsilon: float = 1e-5
  momentum: float = 0.1  # PyTorch's convention: the weight of the new statistics

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    x = x.astype(jnp.float32)
    if not self.train:
      return (x - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
    batch, g = x.shape[0], self.group_size
    if g < 1 or batch % g:
      raise ValueError(f'bn_group_size={g} does not divide the batch of {batch} examples')
    positions = tuple(range(1, x.ndim - 1))
    per_example = (batch,) + (1,) * len(positions) + features

    def group_mean(values):  # (B, C) per-example means -> their group's mean, for each example
      return jnp.repeat(values.reshape(batch // g, g, -1).mean(1), g, axis=0).reshape(per_example)
    # Each example's positions first, then its group's examples: where groups straddle devices only these (B, C)
    # means cross between them, not the activations
    mean = group_mean(x.mean(positions))
    var = group_mean(jnp.square(x - mean).mean(positions))
    y = (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    if not self.is_initializing():
      n = g * math.prod(x.shape[1:-1])  # values per group and channel
      m = self.momentum  # the means over examples are the means over groups: groups are equal in size
      ra_mean.value = (1 - m) * ra_mean.value + m * mean.reshape(batch, -1).mean(0)
      ra_var.value = (1 - m) * ra_var.value + m * (n / (n - 1)) * var.reshape(batch, -1).mean(0)
    return y


class MlpBlock(nn.Module):
  """Dense -> activation -> Dense back to the input width, over the last axis.

  Parameters are `Dense_0` and `Dense_1`, the names of Google's Mixer `MlpBlock`; the module serves Mixer's
  token and channel mixing and DaViT's feed-forward layers.
  """
  mlp_dim: int
  axes: tuple[str, str]  # logical names of (input/output width, hidden width)
  act: str
  dtype: Dtype
  param_dtype: Dtype
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = zeros

  @nn.compact
  def __call__(self, x):
    outer, hidden = self.axes
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
              bias_init=self.bias_init)
    y = dense(self.mlp_dim, (outer, hidden), name='Dense_0', **kw)(x)
    y = activation(self.act)(y)
    return dense(x.shape[-1], (hidden, outer), name='Dense_1', **kw)(y)


# What a rematerialised block keeps from its forward pass for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    'full': None,  # nothing but the block's input: the whole block runs twice (least memory)
    'dots': jax.checkpoint_policies.checkpoint_dots,  # matmul outputs; norms, activations, softmax recomputed
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also recompute attention matmuls
}


def maybe_remat(block: type[nn.Module], remat: bool | str) -> type[nn.Module]:
  """The block class, rematerialised when `remat` (True = 'full', or a `REMAT_POLICIES` name): activations
  the policy does not save are recomputed in the backward pass instead of stored (less memory, more compute).
  Parameters keep their names. Blocks take `(x, train, *per_block)`; `train` is static (argument 2, with self)."""
  if remat in (False, None, 'none'):
    return block
  policy = 'full' if remat is True else remat
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: choose 'none', {', '.join(map(repr, REMAT_POLICIES))} (or False, True)")
  return nn.remat(block, static_argnums=(2,), policy=REMAT_POLICIES[policy])


def scan_blocks(block: nn.Module, x: jax.Array, train: bool, depth: int, *per_block: jax.Array) -> jax.Array:
  """`depth` copies of `block` applied in sequence as one `nn.scan`, x = block(x, train, *per_block[:, i]).

  XLA compiles the block once instead of `depth` times (the compile time of deep models). Each variable of
  the block gets a leading axis of size `depth` (logical name 'layers', replicated by the sharding rules);
  `models.stack_blocks` / `unstack_blocks` move between this layout and the published per-block one. Each block
  draws its own parameter-init and dropout RNGs.
  """
  def body(block, carry, xs):
    return block(carry, train, *xs), None

  scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0}, split_rngs={'params': True, 'dropout': True},
                 length=depth, metadata_params={nn.PARTITION_NAME: 'layers'})
  return scan(block, x, per_block)[0]


def drop_path(x: jax.Array, rate: float | jax.Array | None, *, train: bool, module: nn.Module,
              scale_by_keep: bool) -> jax.Array:
  """Stochastic depth on a residual branch: zero the whole branch for a random subset of examples.

  `scale_by_keep=True` is timm's DropPath (the kept branches are scaled by 1/(1-rate), so the expectation is
  unchanged); `False` is big_vision's Mixer convention (no rescale: the branch is damped by (1-rate) in
  expectation during training and used as is at eval). Draws from the module's 'dropout' RNG stream, one
  draw per example (the leading axis).
  """
  if not train or rate is None or (isinstance(rate, (int, float)) and rate == 0.0):  # an array rate draws
    return x
  dropped = jax.random.bernoulli(module.make_rng('dropout'), rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  mask = 1.0 - dropped.astype(x.dtype)
  if scale_by_keep and rate < 1.0:
    mask = mask / (1.0 - rate)
  return x * mask
