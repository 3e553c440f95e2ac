"""The optimizer (mixer_jax/optim.py) against the sources it reproduces: both weight-decay conventions against
optax.adamw, torch.optim.AdamW and big_vision's chain written out as a formula; lr_mults; frozen parameters; the
one-cycle, big_vision and optax warmup schedules against their sources' formulas. The DaViT recipe's epoch-stepped
cosine against timm's CosineLRScheduler is tests/test_optim_schedule_timm.py's."""
import numpy as np
import jax
import optax
import pytest
import torch

from configs import common, convmixer_i1k, mixer_i1k
from mixer_jax import optim

SHAPES = {'stem': {'kernel': (2, 2, 3, 4), 'bias': (4,)},
          'MixerBlock_0': {'LayerNorm_0': {'scale': (4,)}, 'Dense_0': {'kernel': (4, 6), 'bias': (6,)}},
          'head': {'kernel': (4, 5), 'bias': (5,)}}
B1, B2, EPS = 0.9, 0.999, 1e-3  # ConvMixer's eps: large enough that where it is added matters


def _params_and_grads(steps, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda shape: rng.standard_normal(shape).astype(np.float32)
  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(draw, SHAPES, is_leaf=is_shape)
  grads = [jax.tree.map(draw, SHAPES, is_leaf=is_shape) for _ in range(steps)]
  return params, grads


def _config(**overrides):
  c = common.base_config()
  c.optimizer_kw.update(b1=B1, b2=B2, eps=EPS)
  c.update(overrides)
  return c


def _apply(tx, params, grads):
  """The parameters after each update of tx, as numpy trees, and the final optimizer state."""
  state, out = tx.init(params), []
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.map(np.asarray, params))
  return out, state


def _run(config, params, grads, **durations):
  return _apply(optim.make(config, params, **durations)[0], params, grads)


def _assert_trees_close(got, want, **tol):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), got, want)


def _is_kernel(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', tree)


def test_adamw_style_is_optax_adamw():
  """'adamw': decay lr * weight_decay * p on kernels, both scaled by the schedule (optax.adamw with a scheduled
  learning rate), here a warmup-cosine that ends at 1% of lr."""
  lr, wd, steps = 0.01, 0.05, 6
  params, grads = _params_and_grads(steps)
  config = _config(lr=lr, weight_decay=wd, weight_decay_style='adamw')
  config.schedule.update(type='cosine', end=0.01)
  got, _ = _run(config, params, grads, total_steps=steps, warmup_steps=2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 2, steps, end_value=0.01 * lr)
  want, _ = _apply(optax.adamw(schedule, B1, B2, EPS, weight_decay=wd, mask=_is_kernel), params, grads)
  _assert_trees_close(got, want, rtol=2e-6, atol=1e-7)


def test_adamw_style_is_torch_adamw():
  """The same updates as torch.optim.AdamW with timm's parameter groups (decay on kernels, not on biases and norm
  scales) and the scheduler setting each step's lr, as timm's train.py does."""
  lr, wd, steps, warmup = 0.01, 0.05, 8, 3
  params, grads = _params_and_grads(steps, seed=1)
  config = _config(lr=lr, weight_decay=wd, weight_decay_style='adamw')
  config.schedule.update(type='linear', end=0.1)
  got, _ = _run(config, params, grads, total_steps=steps, warmup_steps=warmup)

  leaves, treedef = jax.tree.flatten(params)
  decayed = jax.tree.leaves(_is_kernel(params))
  tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in leaves]
  adamw = torch.optim.AdamW(
      [{'params': [t for t, d in zip(tensors, decayed) if d], 'weight_decay': wd},
       {'params': [t for t, d in zip(tensors, decayed) if not d], 'weight_decay': 0.0}],
      lr=lr, betas=(B1, B2), eps=EPS)
  sched = optim.schedule_fn('linear', total_steps=steps, warmup_steps=warmup, end=0.1)
  for step, g in enumerate(grads):
    for group in adamw.param_groups:
      group['lr'] = lr * float(sched(step))
    for t, g_leaf in zip(tensors, jax.tree.leaves(g)):
      t.grad = torch.from_numpy(g_leaf)
    adamw.step()
    want = jax.tree.unflatten(treedef, [t.detach().numpy() for t in tensors])
    _assert_trees_close(got[step], want, rtol=1e-5, atol=1e-6)


def _adam_directions(grads):
  """Adam's bias-corrected m / (sqrt(v) + eps) at each step, in float64 (Kingma & Ba, Algorithm 1)."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    g = g.astype(np.float64)
    m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
    out.append(m / (1 - B1 ** t) / (np.sqrt(v / (1 - B2 ** t)) + EPS))
  return out


def test_big_vision_style_and_lr_mults_follow_the_formula():
  """'big_vision' (optim.py's docstring, big_vision's optax chain: scale(lr) -> lr_mults -> add_decayed_weights
  -> schedule): p <- p - s(t) * (lr * m(p) * adam(g) + wd * p) on kernels, so the decay is multiplied neither by
  lr nor by the multiplier; the first matching lr_mults rule wins, unmatched names get 1."""
  lr, wd, steps, warmup = 1e-3, 5e-3, 5, 2  # wd 50x the recipe's, so that 5 steps of decay show
  mults = {'head/kernel': 0.1, 'head/bias': 0.0, 'stem/kernel': 0.5, 'stem/bias': 0.5}
  params, grads = _params_and_grads(steps, seed=2)
  config = _config(lr=lr, weight_decay=wd, weight_decay_style='big_vision',
                   lr_mults=(('head/kernel', 0.1), ('head/.*', 0.0), ('stem/.*', 0.5)))
  config.schedule.update(type='linear', end=1e-5)
  got, _ = _run(config, params, grads, total_steps=steps, warmup_steps=warmup)

  sched = [min(1.0, t / warmup) * (1.0 + (1e-5 - 1.0) * max(0.0, (t - warmup) / (steps - warmup)))
           for t in range(steps)]
  flat = lambda tree: {'/'.join(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for name, p in flat(params).items():
    p = p.astype(np.float64)
    directions = _adam_directions([flat(g)[name] for g in grads])
    decay = wd if name.endswith('/kernel') else 0.0
    for t in range(steps):
      p = p - sched[t] * (lr * mults.get(name, 1.0) * directions[t] + decay * p)
      np.testing.assert_allclose(flat(got[t])[name], p, rtol=1e-5, atol=1e-8, err_msg=f'{name} at step {t}')


def test_frozen_parameters_get_no_update_no_state_and_no_say_in_clipping():
  """Frozen parameters stay bit for bit (no decay either, although wd_mask matches their kernels), hold no
  optimizer state, and their gradients do not enter the global norm that clips the trainable ones."""
  params, grads = _params_and_grads(3, seed=3)
  frozen = dict(frozen=('stem/.*', 'MixerBlock_0/.*'), grad_clip_norm=1.0, weight_decay=0.05)
  got, state = _run(_config(**frozen), params, grads, total_steps=3, warmup_steps=0)
  for p in got:
    jax.tree.map(np.testing.assert_array_equal, {k: p[k] for k in ('stem', 'MixerBlock_0')},
                 {k: params[k] for k in ('stem', 'MixerBlock_0')})
  state_names = {'/'.join(str(getattr(k, 'key', k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert state_names and not any('stem' in n or 'MixerBlock_0' in n for n in state_names), state_names
  # gradients 1000x larger on a frozen parameter change nothing; unfrozen, the same gradients clip the head's
  loud = [{**g, 'stem': jax.tree.map(lambda x: 1e3 * x, g['stem'])} for g in grads]
  head_only, _ = _run(_config(**frozen), params, loud, total_steps=3, warmup_steps=0)
  _assert_trees_close([p['head'] for p in head_only], [p['head'] for p in got], rtol=0, atol=0)
  unfrozen, _ = _run(_config(grad_clip_norm=1.0, weight_decay=0.05), params, loud, total_steps=3, warmup_steps=0)
  assert not np.allclose(unfrozen[-1]['head']['kernel'], got[-1]['head']['kernel'])


@pytest.mark.parametrize('epochs,steps_per_epoch', [(5, 4), (10, 7), (150, 3)])
def test_onecycle_is_the_convmixer_fork_schedule(epochs, steps_per_epoch):
  """locuslab/convmixer's one-cycle: np.interp(t, [0, E*2//5, E*4//5, E], [0, lr, lr/20, 0]) with t = epoch +
  (batch_idx + 1) / len(loader), set before each iteration's update; the recipes' epochs (150, 300) are multiples
  of 5, where its whole-epoch knots are 2T/5 and 4T/5 in steps."""
  config = convmixer_i1k.get_config('variant=1536_20')
  total = epochs * steps_per_epoch
  _, lr_fn = optim.make(config, {'w': np.zeros(1, np.float32)}, total_steps=total, warmup_steps=0)
  epoch, batch_idx = np.divmod(np.arange(total), steps_per_epoch)
  want = np.interp(epoch + (batch_idx + 1) / steps_per_epoch, [0, epochs * 2 // 5, epochs * 4 // 5, epochs],
                   [0, config.lr, config.lr / 20.0, 0])
  np.testing.assert_allclose(np.asarray(lr_fn(np.arange(total)), np.float64), want, rtol=1e-6, atol=1e-9)


def _big_vision_linear(step, *, total, warmup, end):
  """big_vision's utils.create_learning_rate_schedule, decay_type 'linear' with linear_end, base 1."""
  progress = np.clip((step - warmup) / (total - warmup), 0.0, 1.0)
  lr = end + (1.0 - end) * (1.0 - progress)
  return lr * np.minimum(1.0, step / warmup)


def test_mixer_recipe_schedule_is_big_vision():
  """The Mixer recipe (10k warmup steps, linear decay to 1e-5) over a 90k-step run: every step's lr is
  big_vision's."""
  config = mixer_i1k.get_config()
  total, warmup = 90_000, config.schedule.warmup_steps
  _, lr_fn = optim.make(config, {'w': np.zeros(1, np.float32)}, total_steps=total, warmup_steps=warmup)
  steps = np.arange(0, total + 100, 7)
  want = config.lr * _big_vision_linear(steps, total=total, warmup=warmup, end=config.schedule.end)
  # float32 as big_vision computes it: 1 + (end - 1) * progress is exact to an ulp of 1, not of the value near `end`
  np.testing.assert_allclose(np.asarray(lr_fn(steps), np.float64), want, rtol=2e-6, atol=2e-7 * config.lr)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_warmup_from_warmup_init_then_decay_is_optax(kind):
  """A warmup from warmup_init, then a decay that ends at `decay_steps` (counted from the start, warmup included)
  and stays at `end` for the rest of the run: optax's warmup_cosine_decay_schedule and its linear join."""
  total, warmup, decay, init, end = 120, 10, 100, 0.1, 0.02
  sched = optim.schedule_fn(kind, total_steps=total, warmup_steps=warmup, warmup_init=init, end=end,
                            decay_steps=decay)
  if kind == 'cosine':
    reference = optax.warmup_cosine_decay_schedule(init, 1.0, warmup, decay, end_value=end)
  else:
    reference = optax.join_schedules([optax.linear_schedule(init, 1.0, warmup),
                                      optax.linear_schedule(1.0, end, decay - warmup)], [warmup])
  steps = np.arange(total)
  np.testing.assert_allclose(np.asarray(sched(steps)), np.asarray(reference(steps)), rtol=1e-5, atol=1e-7)
