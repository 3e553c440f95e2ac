"""The optimizer from the config: an optax chain in big_vision's order, and the learning-rate schedule.

Per trainable parameter p with gradient g and schedule multiplier s(t) (peak 1):

    g <- clip_by_global_norm(g)                    (grad_clip_norm; trainable parameters only)
    u <- adam(g) | momentum(g) | g                 (optimizer, optimizer_kw)
    u <- lr * m(p) * u                             (lr; m = lr_mults, first matching regex, default 1)
    u <- u + d * p   where p matches wd_mask       (weight decay, see below)
    p <- p - s(t) * u

Weight decay, two conventions (`weight_decay_style`):
  'adamw'      d = lr * weight_decay: decoupled decay as in optax.adamw / torch.optim.AdamW, where the decay is
               multiplied by the learning rate (ConvMixer and DaViT recipes: 2e-5, 0.05).
  'big_vision' d = weight_decay: big_vision's `add_decayed_weights` sits after `scale(lr)`, so its decay is
               *not* multiplied by lr, only by the schedule (Mixer recipe: wd 1e-4 at lr 1e-3, which is
               AdamW's 0.1).
lr_mults scale only the gradient part, not the decay (as in big_vision). `frozen` parameters get no update and
no optimizer state. Names are '/'-joined parameter paths such as 'MixerBlock_0/token_mixing/Dense_0/kernel';
the default wd_mask '.*/kernel$' decays every kernel (stem and head included) and no bias or norm parameter.

Schedules (`schedule.type`), as multipliers of lr after a linear warmup from `warmup_init` to 1:
  'cosine'   1 -> `end` along a half cosine;   'linear'  1 -> `end` linearly;   'constant'
  'onecycle' ConvMixer's piecewise-linear one-cycle (timm fork): 0 -> 1 at 2T/5 -> 1/20 at 4T/5 -> 0 at T,
             stepped per iteration at t + 1 as timm does (no separate warmup).
"""
import re
from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'onecycle')
OPTIMIZERS = ('adam', 'sgd')
WEIGHT_DECAY_STYLES = ('adamw', 'big_vision')


def schedule_fn(kind: str, *, total_steps: int, warmup_steps: int = 0, warmup_init: float = 0.0,
                end: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """A multiplier schedule with peak 1 (the learning rate is lr times this)."""
  if kind not in SCHEDULES:
    raise ValueError(f'unknown schedule {kind!r}; choose one of {SCHEDULES}')
  if warmup_steps >= total_steps and kind != 'constant':
    raise ValueError(f'warmup ({warmup_steps} steps) must be shorter than the run ({total_steps} steps)')
  if kind == 'onecycle':
    if warmup_steps:
      raise ValueError('the onecycle schedule has its own warmup: set schedule.warmup_steps=0')
    knots = np.array([0.0, total_steps * 2 // 5, total_steps * 4 // 5, total_steps], np.float32)
    return lambda step: jnp.interp(step + 1.0, knots, jnp.array([0.0, 1.0, 0.05, 0.0]))

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    if kind == 'cosine':
      decayed = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == 'linear':
      decayed = 1.0 + (end - 1.0) * progress
    else:
      decayed = jnp.ones_like(progress)
    if not warmup_steps:
      return decayed
    warm = warmup_init + (1.0 - warmup_init) * step / warmup_steps
    return jnp.where(step < warmup_steps, warm, decayed)

  return fn


def _first_match(rules: Sequence, name: str):
  """The value of the first (regex, value) rule whose regex fully matches name, else None."""
  return next((value for pattern, value in rules if re.fullmatch(pattern, name)), None)


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _by_name(tree, value_of: Callable[[str], object]):
  """A tree like `tree` holding value_of(name) for each leaf. Path-based, so it also follows the masked trees
  (frozen parameters removed) that optax.multi_transform hands to the inner transformations."""
  return jax.tree_util.tree_map_with_path(lambda path, _: value_of(_path_name(path)), tree)


def _scale_by_name(mult_of: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's multiplier (lr_mults)."""
  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(lambda path, u: u * mult_of(_path_name(path)), updates)
    return scaled, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _base_optimizer(name: str, kw: dict) -> optax.GradientTransformation:
  dtype = lambda d: jnp.dtype(d) if d else None
  if name == 'adam':
    return optax.scale_by_adam(b1=kw.get('b1', 0.9), b2=kw.get('b2', 0.999), eps=kw.get('eps', 1e-8),
                               mu_dtype=dtype(kw.get('mu_dtype')))
  if name == 'sgd':
    momentum = kw.get('momentum', 0.9)
    if not momentum:
      return optax.identity()
    return optax.trace(decay=momentum, nesterov=kw.get('nesterov', False),
                       accumulator_dtype=dtype(kw.get('accumulator_dtype')))
  raise ValueError(f'unknown optimizer {name!r}; choose one of {OPTIMIZERS}')


def make(config, params, *, total_steps: int, warmup_steps: int):
  """(optax transformation, learning-rate function of the step) for a parameter tree (shapes suffice)."""
  kw = {k: v for k, v in dict(config.optimizer_kw).items() if v is not None}
  base = _base_optimizer(config.optimizer, kw)
  if config.weight_decay_style not in WEIGHT_DECAY_STYLES:
    raise ValueError(f'weight_decay_style {config.weight_decay_style!r} must be one of {WEIGHT_DECAY_STYLES}')
  decay = config.weight_decay * (config.lr if config.weight_decay_style == 'adamw' else 1.0)
  sched = schedule_fn(config.schedule.type, total_steps=total_steps, warmup_steps=warmup_steps,
                      warmup_init=config.schedule.warmup_init, end=config.schedule.end)

  frozen = [(pattern, True) for pattern in config.frozen]
  labels = _by_name(params, lambda n: 'frozen' if _first_match(frozen, n) else 'train')
  lr_mults = [tuple(rule) for rule in config.lr_mults]
  mult_of = lambda n: float(next((m for pattern, m in lr_mults if re.fullmatch(pattern, n)), 1.0))
  wd_mask = lambda tree: _by_name(tree, lambda n: any(re.fullmatch(p, n) for p in config.wd_mask))
  train = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm else optax.identity(),
      base,
      optax.scale(config.lr),
      _scale_by_name(mult_of) if lr_mults else optax.identity(),
      optax.add_decayed_weights(decay, mask=wd_mask) if decay else optax.identity(),
      optax.scale_by_schedule(sched),
      optax.scale(-1.0),
  )
  tx = optax.multi_transform({'train': train, 'frozen': optax.set_to_zero()}, labels)
  return tx, lambda step: config.lr * sched(step)
