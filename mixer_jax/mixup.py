"""Per-batch augmentation on device: mixup/cutmix then random erasing, in timm's loader order.

timm's train.py mixes each GPU's batch in its collate function (`FastCollateMixup`, 'batch' mode); its
`PrefetchLoader` then normalises the mixed batch and applies `RandomErasing` to it. The train step (trainer.py)
calls `mix` and then `random_erasing` on the normalised global batch, inside jit.

`mix` is timm.data.Mixup in 'batch' mode applied to each group of the batch: with probability `prob` a group is
mixed with its reverse: mixup (x = lam*x + (1-lam)*x[::-1]) or, with probability `switch_prob` when both alphas are
positive, cutmix (a box of area ~(1-lam) pasted from x[::-1], lam then corrected to the box's real area:
correct_lam). lam ~ Beta(alpha, alpha) of the chosen method; labels mix with the same lam. A group is the whole
global batch (group_size None) or `group_size` examples with their own lam, method and box (timm's per-GPU
batches). The train step lays groups out by the per-device batch (`pairing`): as runs of consecutive examples where
a group fits on one device, so no image moves between devices (the compiled step reduces only the Beta sampler's
scalar loop conditions across them); as pairs of the whole batch's mirror images (i, B-1-i) where groups would
straddle devices, which costs the one collective permute of the global batch's reverse and nothing more. Runs
straddling devices instead made the partitioner materialise several times the batch (ConvMixer-1536/20 at 20
images per TPU core: 62.8 GiB of temporaries against 9.4). The result depends on the data-parallel size only
through that choice.

`random_erasing` is timm.data.RandomErasing with one box (count 1) per image: with probability `prob`, up to 10
tries of area uniform(area_min, area_max)*H*W and aspect exp(uniform(log ratio_min, log ratio_max)); the first
box with h < H and w < W is placed uniformly and filled with N(0, 1) noise per pixel ('pixel'), per channel
('rand') or zeros ('const'); when no try fits the image is left alone.

Choices where the sources differ or are silent:
- The cutmix box spans rows cy - cut_h//2 .. cy + cut_h//2 (end excluded), as in the timm of the ConvMixer and
  DaViT runs; the installed timm 1.0.31 ends it at cy + (cut_h+1)//2, one row (column) more for odd cuts.
- FastCollateMixup blends uint8 images before normalisation and rounds the blend to integers; here the normalised
  float images are blended, the same affine map without that rounding (at most 0.5/255/std per value).
- Erasing applies where u < prob (timm: unless u > prob, which differs only at u == prob); box sides are
  rounded (half to even, as Python's round) from float32 draws, timm's from float64, which can disagree only
  where sqrt(area * aspect) is within float32 rounding of a half-integer.

Must not: know about meshes, models or the input pipeline; the trainer decides where in the step these run.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ERASE_MODES = ('const', 'rand', 'pixel')
_ERASE_TRIES = 10  # timm's attempts per box


def _params(rng, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float,
            switch_prob: float):
  """One group's draws, as timm's Mixup._params_per_batch and rand_bbox make them: (lam, use_cutmix, (cy, cx)).
  lam is 1 and use_cutmix False when the group is not mixed; the box centre is drawn either way."""
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
  ky, kx = jax.random.split(k_box)
  centre = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  return lam, apply & use_cutmix, centre


def _cutmix_mask(lam, centre, height: int, width: int):
  """timm's rand_bbox: a box of side sqrt(1-lam) times the image's around `centre`, clipped at the edges. lam and
  the centre's coordinates are scalars (an (H, W) mask) or one per example (a (B, H, W) mask)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  cy, cx = centre
  clip = lambda x, n: jnp.clip(x, 0, n)[..., None, None]
  yl, yh = clip(cy - cut_h // 2, height), clip(cy + cut_h // 2, height)
  xl, xh = clip(cx - cut_w // 2, width), clip(cx + cut_w // 2, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)


PAIRINGS = ('runs', 'mirrored')


def pairing(group_size: int | None, per_device_batch: int) -> str:
  """How groups are laid out on a batch split over devices in runs of `per_device_batch`: 'runs' where each group
  lies within one device (no image moves between devices), else 'mirrored' (the whole batch's reverse: one
  collective permute, as global mixing takes, at any per-device batch). Odd groups cannot be mirrored."""
  if group_size is None or per_device_batch % group_size == 0 or group_size % 2:
    return 'runs'
  return 'mirrored'


def _group_of(batch: int, group_size: int, layout: str) -> np.ndarray:
  """The group of each example: consecutive runs, or pairs (i, batch-1-i) taken group_size/2 at a time."""
  if layout == 'runs':
    return np.arange(batch) // group_size
  pair = np.minimum(np.arange(batch), batch - 1 - np.arange(batch))
  return pair // (group_size // 2)


def mix(rng, images, labels, *, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
        group_size: int | None = None, layout: str = 'runs'):
  """(images, labels) mixed as timm does per batch, per group of `group_size` examples (None: the whole batch);
  a no-op when both alphas are 0. One group uses `rng` itself, so group_size = batch is the same as None.

  Each group has its own draws (lam, mixup or cutmix, box) and each example is mixed with its partner in its
  group, which is its mirror image in the group's order. `layout` says which examples form a group:
  'runs': each run of group_size consecutive examples, reversed within itself (timm's per-GPU batches);
  'mirrored': example i and its partner batch-1-i (the whole batch reversed, as global mixing pairs them), the
  pairs (i, batch-1-i), i < batch/2, taken group_size/2 at a time in order of i. Shuffled data makes the two
  alike in distribution; `pairing` picks the one that moves fewer images between devices.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  if layout not in PAIRINGS:
    raise ValueError(f'mixup layout {layout!r} is not one of {PAIRINGS}')
  draws = functools.partial(_params, height=images.shape[1], width=images.shape[2], mixup_alpha=mixup_alpha,
                            cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
  batch = images.shape[0]
  if group_size is None or group_size == batch:
    lam, use_cutmix, centre = draws(rng)  # scalars: one (H, W) box serves the batch
    partner = lambda x: x[::-1]
  else:
    if group_size < 1 or batch % group_size or (layout == 'mirrored' and group_size % 2):
      raise ValueError(f'mixup group_size={group_size} does not divide the batch of {batch} examples'
                       + (' into pairs' if batch % group_size == 0 else ''))
    groups = batch // group_size
    # per example, from its group's draws (tiny gathers of constants)
    group_of = _group_of(batch, group_size, layout)
    lam, use_cutmix, centre = jax.tree.map(lambda d: d[group_of], jax.vmap(draws)(jax.random.split(rng, groups)))
    if layout == 'runs':
      partner = lambda x: x.reshape(groups, group_size, *x.shape[1:])[:, ::-1].reshape(x.shape)
    else:
      partner = lambda x: x[::-1]
  box = _cutmix_mask(lam, centre, images.shape[1], images.shape[2]) & use_cutmix[..., None, None]
  lam = jnp.where(use_cutmix, 1.0 - box.mean((-2, -1)), lam)  # correct_lam: the box may be clipped at the edges
  per_image = lambda x: x.reshape(x.shape + (1,) * (images.ndim - 1)) if x.ndim else x
  per_label = lambda x: x[..., None] if x.ndim else x
  partner_images = partner(images)
  mixed = jnp.where(per_image(use_cutmix), jnp.where(box[..., None], partner_images, images),
                    per_image(lam) * images + (1.0 - per_image(lam)) * partner_images)
  return mixed.astype(images.dtype), per_label(lam) * labels + (1.0 - per_label(lam)) * partner(labels)


class _ErasingDraws(NamedTuple):
  """Per image, what timm's RandomErasing._erase draws: the apply uniform u, each try's area fraction and log
  aspect, and the chosen box (top, left, h, w; h = w = 0 when no try fits); and the fill."""
  u: jax.Array  # (B,)
  area: jax.Array  # (B, tries)
  log_ratio: jax.Array  # (B, tries)
  top: jax.Array  # (B,) int32
  left: jax.Array
  h: jax.Array
  w: jax.Array
  fill: jax.Array  # (B, H, W, C) for 'pixel', (B, 1, 1, C) for 'rand', () for 'const'


def _erasing_draws(rng, shape, dtype, *, mode: str, area_min: float, area_max: float, ratio_min: float,
                   ratio_max: float) -> _ErasingDraws:
  batch, height, width, channels = shape
  k_apply, k_area, k_ratio, k_top, k_left, k_fill = jax.random.split(rng, 6)
  u = jax.random.uniform(k_apply, (batch,))
  area = jax.random.uniform(k_area, (batch, _ERASE_TRIES), minval=area_min, maxval=area_max)
  log_ratio = jax.random.uniform(k_ratio, (batch, _ERASE_TRIES), minval=math.log(ratio_min),
                                 maxval=math.log(ratio_max))
  target, aspect = area * (height * width), jnp.exp(log_ratio)
  h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)[:, None]  # the first try that fits; 0 when none does, and `found` says so
  found = jnp.take_along_axis(fits, first, axis=1)[:, 0]
  h = jnp.where(found, jnp.take_along_axis(h, first, axis=1)[:, 0], 0)
  w = jnp.where(found, jnp.take_along_axis(w, first, axis=1)[:, 0], 0)
  top = jax.random.randint(k_top, (batch,), 0, height - h + 1)  # timm's random.randint includes its end
  left = jax.random.randint(k_left, (batch,), 0, width - w + 1)
  if mode == 'pixel':
    fill = jax.random.normal(k_fill, shape, dtype)
  elif mode == 'rand':
    fill = jax.random.normal(k_fill, (batch, 1, 1, channels), dtype)
  elif mode == 'const':
    fill = jnp.zeros((), dtype)
  else:
    raise ValueError(f'random erasing mode {mode!r} is not one of {ERASE_MODES}')
  return _ErasingDraws(u, area, log_ratio, top, left, h, w, fill)


def random_erasing(rng, images, *, prob: float, mode: str, area_min: float, area_max: float, ratio_min: float,
                   ratio_max: float):
  """NHWC float `images` with one box per image erased as timm's RandomErasing (see the module docstring)."""
  d = _erasing_draws(rng, images.shape, images.dtype, mode=mode, area_min=area_min, area_max=area_max,
                     ratio_min=ratio_min, ratio_max=ratio_max)
  rows, cols = jnp.arange(images.shape[1])[None, :], jnp.arange(images.shape[2])[None, :]
  in_rows = (rows >= d.top[:, None]) & (rows < (d.top + d.h)[:, None])
  in_cols = (cols >= d.left[:, None]) & (cols < (d.left + d.w)[:, None])
  erase = in_rows[:, :, None] & in_cols[:, None, :] & (d.u < prob)[:, None, None]
  return jnp.where(erase[..., None], d.fill, images)
