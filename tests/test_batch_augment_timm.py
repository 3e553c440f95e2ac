"""The per-batch augmentation on device (mixer_jax/mixup.py) against timm, both driven by our random draws:
grouped mixup/cutmix against timm.data.Mixup ('batch' mode) run on each group, random erasing (with the batch
sharded over 4 devices) against timm.data.RandomErasing; the erasing sampler's statistics; and the train step with
erasing on the 8-device mesh."""
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from torch_reference import torch
from timm.data import mixup as timm_mixup
from timm.data import random_erasing as timm_erasing

from configs import quickstart
from mixer_jax import losses, mixup, models, optim, sharding, trainer

MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
ERASING = dict(area_min=0.02, area_max=1 / 3, ratio_min=0.3, ratio_max=1 / 0.3)  # timm's defaults


def on_four_devices(fn, rng, *batch):
  """fn(rng, *batch) jitted with the batch sharded over a 4-device mesh."""
  batch_sh = sharding.batch_sharding(sharding.make_mesh((4, 1, 1), devices=jax.devices()[:4]))
  return jax.device_get(jax.jit(fn, in_shardings=(None,) + (batch_sh,) * len(batch))(rng, *batch))


def timm_mix(images, targets, draws, classes):
  """timm's Mixup on one group (NHWC numpy in and out), its random draws replaced by ours: the apply and switch
  uniforms by values that take our decisions, the Beta sample by our lam, the box centre by ours."""
  lam, use_cutmix, (cy, cx) = draws
  uniforms = iter([0.0 if lam != 1 else 1.0, 0.0 if use_cutmix else 1.0])
  centre = iter([cy, cx])
  draw = dict(rand=lambda: next(uniforms), beta=lambda a, b: float(lam), randint=lambda low, high, size: next(centre))
  with pytest.MonkeyPatch.context() as m:
    for name, fn in draw.items():
      m.setattr(timm_mixup.np.random, name, fn)
    mixer = timm_mixup.Mixup(**MIX, mode='batch', correct_lam=True, label_smoothing=0.0, num_classes=classes)
    x, target = mixer(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(targets))
  return x.numpy().transpose(0, 2, 3, 1), target.numpy()


# The examples of each group of 4 in a batch of 16, in the order timm's per-GPU batch would hold them.
GROUPS = {'runs': np.split(np.arange(16), 4),
          'mirrored': [np.array([0, 1, 14, 15]), np.array([2, 3, 12, 13]), np.array([4, 5, 10, 11]),
                       np.array([6, 7, 8, 9])]}


@pytest.mark.parametrize('layout', mixup.PAIRINGS)
def test_grouped_mix_is_timm_batch_mixup_on_each_group(layout):
  """4 groups of 4, as runs of consecutive examples or as mirrored pairs; the key is chosen so the draws hold a
  mixup group, two cutmix groups with boxes clipped at the edges and an unmixed group. Their cuts are even: the
  installed timm ends the box at cy + (cut+1)//2, one row (column) past the runs' timm and ours for odd cuts
  (mixup.py); on even cuts the two agree."""
  images = np.random.default_rng(0).standard_normal((16, 6, 10, 3)).astype(np.float32)
  targets = np.arange(16) % 5

  def run(rng, images, labels):  # mix, and the draws of its groups (mix's key per group: split(rng, groups))
    return (mixup.mix(rng, images, labels, **MIX, group_size=4, layout=layout),
            jax.vmap(lambda k: mixup._params(k, 6, 10, **MIX))(jax.random.split(rng, 4)))
  (mixed, labels), (lam, use_cutmix, (cy, cx)) = jax.device_get(jax.jit(run)(
      jax.random.PRNGKey(190), images, np.eye(5, dtype=np.float32)[targets]))
  kinds = []
  for g, part in enumerate(GROUPS[layout]):
    kinds.append('none' if lam[g] == 1 else 'cutmix' if use_cutmix[g] else 'mixup')
    if use_cutmix[g]:
      cut_h, cut_w = int(6 * math.sqrt(1 - lam[g])), int(10 * math.sqrt(1 - lam[g]))
      assert cut_h > 0 and cut_h % 2 == 0 and cut_w % 2 == 0
    want, want_labels = timm_mix(images[part], targets[part], (lam[g], use_cutmix[g], (cy[g], cx[g])), 5)
    np.testing.assert_array_equal(mixed[part], want)
    # one float32 ulp: our corrected lam is 1 - mean(box) in float32, timm's is computed in float64
    np.testing.assert_allclose(labels[part], want_labels, rtol=0, atol=6e-8)
  assert sorted(kinds) == ['cutmix', 'cutmix', 'mixup', 'none']
  with pytest.raises(ValueError, match='mixup group_size=6 does not divide the batch of 16 examples$'):
    mixup.mix(jax.random.PRNGKey(0), images, labels, **MIX, group_size=6, layout=layout)
  if layout == 'mirrored':
    with pytest.raises(ValueError, match='mixup group_size=1 does not divide the batch of 16 examples into pairs'):
      mixup.mix(jax.random.PRNGKey(0), images, labels, **MIX, group_size=1, layout=layout)


@pytest.mark.slow
def test_groups_straddling_devices_move_what_global_mixing_moves():
  """On 8 devices of 6 examples, groups of 4 straddle devices: `pairing` mirrors them, and the compiled mixing
  moves images between devices exactly as mixing the whole batch does (one collective permute of its reverse),
  where runs of 4 would gather the whole batch on every device. Groups of 2 or 6 lie within a device and move
  nothing."""
  from mixer_jax import hlo
  assert [mixup.pairing(g, 6) for g in (None, 1, 2, 3, 4, 6, 8, 12)] == [
      'runs', 'runs', 'runs', 'runs', 'mirrored', 'runs', 'mirrored', 'mirrored']
  batch_sh = sharding.batch_sharding(sharding.make_mesh((8, 1, 1)))

  def moved(group_size, layout=None):
    layout = layout or mixup.pairing(group_size, 6)
    fn = lambda rng, x, y: mixup.mix(rng, x, y, **MIX, group_size=group_size, layout=layout)
    text = jax.jit(fn, in_shardings=(None, batch_sh, batch_sh), out_shardings=batch_sh).lower(
        jax.random.PRNGKey(0), jnp.zeros((48, 4, 4, 3)), jnp.zeros((48, 5))).compile().as_text()
    return {kind: c for kind, c in hlo.collectives(text).items() if kind != 'all-reduce'}  # the sampler's flags
  whole = moved(None)
  assert set(whole) == {'collective-permute'}
  assert moved(4) == moved(8) == whole
  assert 'all-gather' in moved(4, 'runs')
  assert moved(2) == moved(6) == {}


def test_one_group_is_the_global_mixing():
  """group_size = batch traces to the very program of group_size None (the mixing before groups existed), so
  their results are equal bit for bit."""
  trace = lambda **group: str(jax.make_jaxpr(lambda r, x, y: mixup.mix(r, x, y, **MIX, **group))(
      jax.random.PRNGKey(0), jnp.zeros((16, 6, 10, 3)), jnp.zeros((16, 5))))
  assert trace(group_size=16) == trace()


def timm_erase(images, d, *, prob, mode, area_min, area_max, ratio_min, ratio_max):
  """timm's RandomErasing on the NHWC batch, its `random` draws replaced by ours (`d`, an _ErasingDraws) and its
  fill by our fill at the box it places."""
  state = dict(image=-1)

  class OurRandom:
    def random(self):
      state.update(image=state['image'] + 1, draw=0, corner=[])
      return float(d.u[state['image']])

    def uniform(self, low, high):  # each try draws an area fraction, then a log aspect
      i, draw = state['image'], state['draw']
      state['draw'] += 1
      value = float((d.area, d.log_ratio)[draw % 2][i, draw // 2])
      assert low <= value <= high
      return value

    def randint(self, low, high):
      value = int((d.top, d.left)[len(state['corner'])][state['image']])
      assert low <= value <= high  # timm's inclusive range holds our corner
      state['corner'].append(value)
      return value

  def our_fill(per_pixel, rand_color, patch_size, dtype, device):
    (top, left), (_, h, w) = state['corner'], patch_size
    fill = np.broadcast_to(d.fill, images.shape)[state['image'], top:top + h, left:left + w]
    return torch.from_numpy(np.ascontiguousarray(fill.transpose(2, 0, 1)))

  with pytest.MonkeyPatch.context() as m:
    m.setattr(timm_erasing, 'random', OurRandom())
    m.setattr(timm_erasing, '_get_pixels', our_fill)
    eraser = timm_erasing.RandomErasing(prob, area_min, area_max, ratio_min, ratio_max, mode=mode, device='cpu')
    out = eraser(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('mode,prob,erasing', [
    ('pixel', 0.5, ERASING),
    ('const', 1.0, ERASING),
    # large boxes: boxes placed after tries that did not fit, and images where none fits (left alone)
    ('rand', 1.0, dict(area_min=0.7, area_max=0.95, ratio_min=0.5, ratio_max=3.0)),
])
def test_random_erasing_is_timm(mode, prob, erasing):
  images = np.random.default_rng(0).standard_normal((12, 12, 9, 3)).astype(np.float32)  # not square
  options = dict(mode=mode, **erasing)
  out, d = on_four_devices(lambda r, x: (mixup.random_erasing(r, x, prob=prob, **options),
                                         mixup._erasing_draws(r, x.shape, x.dtype, **options)),
                           jax.random.PRNGKey(1), images)
  np.testing.assert_array_equal(out, timm_erase(images, d, prob=prob, **options))
  erased = (out != images).any((1, 2, 3))
  assert erased.any() and (prob == 1 or not erased.all())
  if erasing['area_min'] > 0.5:
    sides = np.round(np.sqrt(d.area[..., None] * 108 * np.exp(np.stack([d.log_ratio, -d.log_ratio], -1))))
    fits = (sides[..., 0] < 12) & (sides[..., 1] < 9)
    assert (fits.any(1) & ~fits[:, 0]).any() and (~fits.any(1)).any()
    np.testing.assert_array_equal(erased, fits.any(1))


def test_random_erasing_statistics():
  """4000 images of 16x16: the share erased is prob within 5 sigma; each erased region is one rectangle whose
  sides are those of an area and aspect inside the ranges (to the rounding of each side: +-0.5); the ranges are
  used (aspects beyond 1/2 and 2), and boxes reach every edge (the corner's range includes its end)."""
  n, size, prob = 4000, 16, 0.25
  out = jax.jit(lambda r: mixup.random_erasing(r, jnp.full((n, size, size, 1), 10.0), prob=prob, mode='pixel',
                                               **ERASING))(jax.random.PRNGKey(2))
  changed = np.asarray(out)[..., 0] != 10.0
  erased = changed.any((1, 2))
  assert abs(erased.mean() - prob) < 5 * math.sqrt(prob * (1 - prob) / n)
  changed = changed[erased]
  rows, cols = changed.any(2), changed.any(1)
  h, w, top, left = rows.sum(1), cols.sum(1), rows.argmax(1), cols.argmax(1)
  assert (changed.sum((1, 2)) == h * w).all() and rows[np.arange(len(h)), top + h - 1].all()  # rectangles
  low, high = ERASING['area_min'] * size**2, ERASING['area_max'] * size**2
  assert ((h - 0.5) * (w - 0.5) <= high).all() and ((h + 0.5) * (w + 0.5) >= low).all()
  assert ((h - 0.5) / (w + 0.5) <= ERASING['ratio_max']).all()
  assert ((h + 0.5) / (w - 0.5) >= ERASING['ratio_min']).all()
  assert (h / w < 0.5).any() and (h / w > 2).any()
  assert (top == 0).any() and (left == 0).any() and (top + h == size).any() and (left + w == size).any()


@pytest.mark.slow
def test_train_step_erases_after_mixup_on_the_mesh(monkeypatch):
  """The step on 8 devices erases what `mix` returned, with its own key: its loss is the model's on the batch
  erased here with split(step rng, 3)[2] on one device. (Mixup is off: its Beta sampler would double the compile
  time, and `mix` is tested above.)"""
  c = quickstart.get_config()
  c.model = dict(name='mixer_s16', patch_size=7, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16,
                 image_size=14, in_channels=1, dtype='float32')
  c.random_erasing.prob = 1.0
  c.optimizer, c.grad_clip_norm, c.label_smoothing = 'sgd', None, 0.0
  batch = dict(image=np.random.default_rng(0).standard_normal((32, 14, 14, 1)).astype(np.float32),
               labels=np.eye(10, dtype=np.float32)[np.arange(32) % 10])
  real_mix, real_erasing, traced = mixup.mix, mixup.random_erasing, []

  def mix(*args, **kw):
    out = real_mix(*args, **kw)
    traced.append(('mix', out[0]))
    return out

  def erasing(rng, images, **kw):
    traced.append(('erasing', images))
    return real_erasing(rng, images, **kw)
  monkeypatch.setattr(mixup, 'mix', mix)
  monkeypatch.setattr(mixup, 'random_erasing', erasing)
  mesh = sharding.make_mesh((8, 1, 1))
  model = trainer.build_model(c)
  tx, lr_fn = optim.make(c, models.abstract_variables(model)['params'], total_steps=10, warmup_steps=1)
  _, shardings = trainer.state_shardings(model, tx, mesh, c.sharding_rules)
  state = trainer.init_state(model, tx, c, jax.random.PRNGKey(0), shardings)
  params, rng = jax.device_get((state.params, jax.random.fold_in(state.rng, 0)))
  _, metrics = trainer.make_train_step(model, tx, lr_fn, c, mesh, shardings)(state, sharding.global_batch(batch, mesh))
  assert [name for name, _ in traced] == ['mix', 'erasing'] and traced[1][1] is traced[0][1]  # on mix's images

  def loss(params, images, labels):
    images = real_erasing(jax.random.split(rng, 3)[2], images, **c.random_erasing.to_dict())
    return losses.softmax_xent(model.apply({'params': params}, images, train=True)[0], labels).mean()
  want = jax.jit(loss)(params, batch['image'], batch['labels'])
  np.testing.assert_allclose(metrics['loss'], want, rtol=1e-6)  # the mean's summation order differs across devices

