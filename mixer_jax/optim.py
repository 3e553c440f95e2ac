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
The decay reaches `end` at `schedule.decay_*` (optax's decay_steps, timm's t_initial: counted from the start of
the run, warmup included; default the run's end) and stays there: timm's cooldown epochs are the run beyond it.
Two options reproduce timm's epoch-based schedulers (DaViT: CosineLRScheduler, t_in_epochs, warmup_prefix False):
  `schedule.per_epoch`      the value changes once per epoch: step s gets the value at the start of its epoch,
                            floor(s / steps_per_epoch) with steps_per_epoch = examples / batch size (the trainer's;
                            a batch straddling two epochs counts in the first). The clock then counts whole epochs,
                            so warmup and decay are rounded to whole epochs (timm's are integers), and the table of
                            per-epoch values is computed in float64 on the host.
  `schedule.warmup_prefix`  True (default): the decay starts after the warmup (progress (t - W) / (D - W));
                            False: the warmup runs inside the decay's clock (progress t / D), as timm's default, so
                            the first value after the warmup is already below 1.
"""
import math
import re
from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'onecycle')
OPTIMIZERS = ('adam', 'sgd')
WEIGHT_DECAY_STYLES = ('adamw', 'big_vision')


def _multiplier(xp, kind: str, t, *, warmup, decay, warmup_init: float, end: float, warmup_prefix: bool):
  """The schedule's value at time t (steps, or epochs with per_epoch), written once for numpy (the per-epoch
  table, float64) and jax.numpy (per-step, inside the step)."""
  start = warmup if warmup_prefix else 0
  progress = xp.clip((t - start) / max(decay - start, 1), 0.0, 1.0)
  if kind == 'cosine':
    decayed = end + (1.0 - end) * 0.5 * (1.0 + xp.cos(xp.pi * progress))
  elif kind == 'linear':
    decayed = 1.0 + (end - 1.0) * progress
  else:
    decayed = xp.ones_like(progress)
  if not warmup:
    return decayed
  return xp.where(t < warmup, warmup_init + (1.0 - warmup_init) * t / warmup, decayed)


def _per_epoch(values_at, steps_per_epoch: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """values_at(epochs) looked up by the epoch of each step. Epoch e starts at step ceil(e * steps_per_epoch),
  found by an exact integer search: floor(step / steps_per_epoch) in float32 misplaces steps next to a boundary.
  The rounding to 6 decimals undoes float error in steps_per_epoch = examples / batch (a true boundary is an
  integer or at least 1 / batch above one)."""
  epochs = np.arange(math.floor((total_steps - 1) / steps_per_epoch) + 1, dtype=np.float64)
  starts = jnp.asarray(np.ceil(np.round(epochs * steps_per_epoch, 6)), jnp.int32)
  values = jnp.asarray(values_at(epochs), jnp.float32)
  return lambda step: values[jnp.searchsorted(starts, jnp.asarray(step, jnp.int32), side='right') - 1]


def schedule_fn(kind: str, *, total_steps: int, warmup_steps: int = 0, warmup_init: float = 0.0,
                end: float = 0.0, decay_steps: int | None = None, warmup_prefix: bool = True,
                steps_per_epoch: float | None = None) -> Callable[[jax.Array], jax.Array]:
  """A multiplier schedule with peak 1 (the learning rate is lr times this). The decay ends at decay_steps
  (None: total_steps); steps_per_epoch steps it once per epoch (see the module docstring)."""
  if kind not in SCHEDULES:
    raise ValueError(f'unknown schedule {kind!r}; choose one of {SCHEDULES}')
  span = 'the run' if decay_steps is None else 'the decay'
  decay_steps = total_steps if decay_steps is None else decay_steps
  if warmup_steps >= decay_steps and kind != 'constant':
    raise ValueError(f'warmup ({warmup_steps} steps) must be shorter than {span} ({decay_steps} steps)')
  if kind == 'onecycle':
    if warmup_steps or decay_steps != total_steps or steps_per_epoch:
      raise ValueError('the onecycle schedule has its own warmup and decay over the whole run, stepped per '
                       'iteration: set schedule.warmup_steps=0, no schedule.decay and schedule.per_epoch=False')
    knots = np.array([0.0, total_steps * 2 // 5, total_steps * 4 // 5, total_steps], np.float32)
    return lambda step: jnp.interp(step + 1.0, knots, jnp.array([0.0, 1.0, 0.05, 0.0]))
  shape = dict(warmup_init=warmup_init, end=end, warmup_prefix=warmup_prefix)
  if steps_per_epoch:
    warmup, decay = round(warmup_steps / steps_per_epoch), round(decay_steps / steps_per_epoch)
    if warmup >= decay and kind != 'constant':
      raise ValueError(f'per epoch, the warmup ({warmup} epochs) must be shorter than the decay ({decay} epochs)')
    return _per_epoch(lambda t: _multiplier(np, kind, t, warmup=warmup, decay=decay, **shape), steps_per_epoch,
                      total_steps)
  return lambda step: _multiplier(jnp, kind, jnp.asarray(step, jnp.float32), warmup=warmup_steps,
                                  decay=decay_steps, **shape)


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


def make(config, params, *, total_steps: int, warmup_steps: int, decay_steps: int | None = None,
         steps_per_epoch: float | None = None):
  """(optax transformation, learning-rate function of the step) for a parameter tree (shapes suffice).

  decay_steps and steps_per_epoch come from the trainer, which knows the dataset's size: None (a program compiled
  without the data, mixer_jax/aot.py) decays over the whole run and steps a per_epoch schedule per step."""
  kw = {k: v for k, v in dict(config.optimizer_kw).items() if v is not None}
  base = _base_optimizer(config.optimizer, kw)
  if config.weight_decay_style not in WEIGHT_DECAY_STYLES:
    raise ValueError(f'weight_decay_style {config.weight_decay_style!r} must be one of {WEIGHT_DECAY_STYLES}')
  decay = config.weight_decay * (config.lr if config.weight_decay_style == 'adamw' else 1.0)
  sched = schedule_fn(config.schedule.type, total_steps=total_steps, warmup_steps=warmup_steps,
                      warmup_init=config.schedule.warmup_init, end=config.schedule.end, decay_steps=decay_steps,
                      warmup_prefix=config.schedule.warmup_prefix,
                      steps_per_epoch=steps_per_epoch if config.schedule.per_epoch else None)

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
