"""Analytic multiply-accumulates per image for the three families: the model FLOPs behind MFU.

FLOPs = 2 x MACs for inference; a training step costs 3 x the forward pass (the backward pass computes a gradient
for the activations and one for the weights), the convention of PaLM's MFU (Chowdhery et al., 2022, appendix B).
Counted: every matmul and convolution, the depthwise convolutions (ConvMixer's and DaViT's CPEs; timm's own counts
omit them) and attention's two matmuls; not counted: norms, activations, softmax and the optimizer (a few
percent; `mixer_jax.bench` shows XLA's own count beside this one). Padding is counted: DaViT's window attention
works on the padded grid.
"""
import math

from mixer_jax.models import layers
from mixer_jax.models.convmixer import ConvMixer
from mixer_jax.models.davit import STEM_STRIDE, DaViT
from mixer_jax.models.mlp_mixer import MlpMixer


def _mixer(m: MlpMixer, h: int, w: int) -> int:
  p, c = m.patch_size, m.hidden_dim
  tokens = (h // p) * (w // p)
  stem = tokens * p * p * m.in_channels * c
  block = 2 * tokens * m.tokens_mlp_dim * c + 2 * tokens * c * m.channels_mlp_dim
  return stem + m.num_blocks * block + c * (m.num_classes or 0)


def _convmixer(m: ConvMixer, h: int, w: int) -> int:
  c, p = m.dim, m.patch_size
  tokens = (h // p) * (w // p)
  stem = tokens * p * p * m.in_channels * c
  block = tokens * (m.kernel_size ** 2 * c + c * c)  # depthwise + pointwise
  return stem + m.depth * block + c * (m.num_classes or 0)


def _davit(m: DaViT, h: int, w: int) -> int:
  ws = m.window_size
  h, w = math.ceil(h / STEM_STRIDE), math.ceil(w / STEM_STRIDE)
  macs = h * w * 7 * 7 * m.in_channels * m.dims[0]
  for s, (c, depth, heads) in enumerate(zip(m.dims, m.depths, m.num_heads)):
    if s:
      h, w = math.ceil(h / 2), math.ceil(w / 2)
      macs += h * w * 2 * 2 * m.dims[s - 1] * c
    n = h * w
    padded = math.ceil(h / ws) * ws * math.ceil(w / ws) * ws
    cpe_and_mlp = 2 * 9 * c * n + 2 * int(c * m.mlp_ratio) * c * n
    window = padded * (4 * c * c + 2 * ws * ws * c)  # qkv + proj on the padded grid, q.k and p.v per window
    channel = n * 4 * c * c + 2 * n * c * (c // heads)  # qkv + proj, k^T.v and p.q per channel group
    macs += depth * (2 * cpe_and_mlp + window + channel)
  return macs + m.dims[-1] * (m.num_classes or 0)


_FAMILIES = ((MlpMixer, _mixer), (ConvMixer, _convmixer), (DaViT, _davit))


def macs_per_image(model, image_size=None) -> int:
  """Forward-pass MACs for one image at `image_size` (default: the model's)."""
  h, w = layers.pair(image_size or model.image_size)
  for cls, count in _FAMILIES:
    if isinstance(model, cls):
      return count(model, h, w)
  raise TypeError(f'no FLOP count for {type(model).__name__}; known: {", ".join(c.__name__ for c, _ in _FAMILIES)}')


def flops_per_image(model, mode: str, image_size=None) -> float:
  """Model FLOPs per image of an inference (`'infer'`) or training (`'train'`) step."""
  passes = {'infer': 1, 'train': 3}
  if mode not in passes:
    raise ValueError(f"mode {mode!r}: choose 'train' or 'infer'")
  return 2.0 * passes[mode] * macs_per_image(model, image_size)
