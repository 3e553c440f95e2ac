"""Mixup and CutMix on device, with timm's semantics (`timm.data.Mixup`, batch mode).

With probability `prob` the whole batch is mixed with its reverse: mixup (x = lam*x + (1-lam)*x[::-1]) or, with
probability `switch_prob` when both alphas are positive, cutmix (a box of area ~(1-lam) pasted from x[::-1],
lam then corrected to the box's real area). lam ~ Beta(alpha, alpha) of the chosen method; labels mix with the
same lam. Mixing over the *global* batch makes the result independent of how the batch is sharded.
"""
import jax
import jax.numpy as jnp


def _cutmix_mask(rng, lam, height: int, width: int):
  """timm's rand_bbox: a box of side sqrt(1-lam) times the image's, centred uniformly, clipped at the edges."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)


def mix(rng, images, labels, *, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float):
  """(images, labels) mixed as timm does per batch; a no-op when both alphas are 0."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)

  reversed_images = images[::-1]
  box = _cutmix_mask(k_box, lam, images.shape[1], images.shape[2])
  box = box & apply & use_cutmix
  lam = jnp.where(use_cutmix, 1.0 - box.mean(), lam)  # correct_lam: the box may be clipped at the edges
  mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], reversed_images, images),
                    lam * images + (1.0 - lam) * reversed_images)
  return mixed.astype(images.dtype), lam * labels + (1.0 - lam) * labels[::-1]
