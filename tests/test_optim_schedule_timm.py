"""The DaViT recipe's schedule against timm's CosineLRScheduler, stepped once per epoch as timm's train.py does.

timm sets epoch 0's lr when the scheduler is built and calls `step(epoch + 1)` after each epoch; the lr of every
iteration of epoch e is therefore `_get_lr(e)`. Our schedule must give that value at every step of the epoch.
"""
import math

import numpy as np
import optax
import pytest

from torch_reference import torch  # before timm: it makes torchvision importable on a CPU-only torch
from timm.scheduler.cosine_lr import CosineLRScheduler

from configs import davit_i1k
from mixer_jax import config_checks, optim


def timm_lrs(*, lr, epochs, cooldown, warmup, warmup_lr, min_lr):
  """The lr of each epoch of a timm run: `epochs + cooldown` epochs, as train.py's loop sets them."""
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
  scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr, warmup_t=warmup,
                                warmup_lr_init=warmup_lr, t_in_epochs=True)
  lrs = []
  for epoch in range(epochs + cooldown):
    lrs.append(optimizer.param_groups[0]['lr'])
    scheduler.step(epoch + 1)
  return np.array(lrs)


def recipe_lr_fn(*, epochs, steps_per_epoch, arg='variant=small'):
  """lr_fn of optim.make on the DaViT recipe, its durations resolved as the trainer resolves them (epochs times
  steps per epoch, rounded up)."""
  config = davit_i1k.get_config(f'{arg},epochs={float(epochs)}')
  steps = lambda e: math.ceil(e * steps_per_epoch)
  _, lr_fn = optim.make(config, {'w': np.zeros(1, np.float32)}, total_steps=steps(config.total_epochs),
                        warmup_steps=steps(config.schedule.warmup_epochs),
                        decay_steps=steps(config.schedule.decay_epochs), steps_per_epoch=steps_per_epoch)
  return config, lr_fn


def recipe_timm_lrs(config, epochs):
  return timm_lrs(lr=config.lr, epochs=epochs, cooldown=davit_i1k.COOLDOWN_EPOCHS,
                  warmup=int(config.schedule.warmup_epochs), warmup_lr=1e-6, min_lr=1e-5)


def test_every_step_matches_timm():
  """A short run (12 + 10 cooldown epochs of 5 steps): every step's lr is timm's lr of its epoch."""
  steps_per_epoch = 5
  config, lr_fn = recipe_lr_fn(epochs=12, steps_per_epoch=steps_per_epoch)
  expected = np.repeat(recipe_timm_lrs(config, 12), steps_per_epoch)
  steps = np.arange(len(expected))
  np.testing.assert_allclose(np.asarray(lr_fn(steps), np.float64), expected, rtol=2.5e-7)
  # the multiplier itself, before lr * in float32: one float32 rounding of timm's float64 value
  sched = optim.schedule_fn('cosine', total_steps=len(expected), warmup_steps=5 * steps_per_epoch,
                            warmup_init=config.schedule.warmup_init, end=config.schedule.end,
                            decay_steps=12 * steps_per_epoch, warmup_prefix=False, steps_per_epoch=steps_per_epoch)
  np.testing.assert_allclose(config.lr * np.asarray(sched(steps), np.float64), expected, rtol=1e-7)


def test_imagenet_epochs_match_timm():
  """The recipe's own numbers (300 + 10 epochs, ImageNet's 1,281,167 images at batch 1024: 1251.14 steps per
  epoch, so batches straddle epochs): the first and last step of chosen epochs get timm's lr of that epoch."""
  steps_per_epoch = 1_281_167 / 1024
  config, lr_fn = recipe_lr_fn(epochs=300, steps_per_epoch=steps_per_epoch)
  expected = recipe_timm_lrs(config, 300)
  epochs = np.array([0, 1, 4, 5, 6, 150, 298, 299, 300, 309])
  first = np.ceil(epochs * steps_per_epoch).astype(np.int32)
  last = np.ceil((epochs + 1) * steps_per_epoch).astype(np.int32) - 1
  for steps in (first, last):
    np.testing.assert_allclose(np.asarray(lr_fn(steps), np.float64), expected[epochs], rtol=2.5e-7)


@pytest.mark.parametrize('variant', sorted(davit_i1k.DROP_PATH))
def test_recipe_passes_config_checks(variant):
  config = davit_i1k.get_config(f'variant={variant}')
  config_checks.check(config)
  assert config.total_epochs == 310 and config.schedule.decay_epochs == 300


def test_default_schedule_unchanged():
  """Without the new options the cosine decays over the run after its warmup, from 1 (optax's schedule)."""
  sched = optim.schedule_fn('cosine', total_steps=100, warmup_steps=10, warmup_init=0.0, end=0.01)
  reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100, end_value=0.01)
  steps = np.arange(120)
  np.testing.assert_allclose(np.asarray(sched(steps)), np.asarray(reference(steps)), rtol=1e-5, atol=1e-7)
