"""The training loop on 8 simulated CPU devices: parallelism equivalence, exact resume (also past a damaged
checkpoint), cross-mesh restore, gradient accumulation, learning (bad inputs: test_bad_inputs.py)."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import jax
from flax import traverse_util

import fake_data
from configs import quickstart
from mixer_jax import checkpoint, cli, data, models, optim, sharding, trainer
from mixer_jax.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'mixer': dict(name='mixer_s16', patch_size=7, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                  channels_mlp_dim=32, image_size=28),
    'convmixer': dict(name='convmixer_256_8', dim=16, depth=2, kernel_size=3, patch_size=4, image_size=28),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A prepared Fashion-MNIST-like dataset: 256 train / 64 test images with learnable labels."""
  root = tmp_path_factory.mktemp('fmnist')
  idx = fake_data.fashion_mnist_like(str(root / 'idx'), train=256, test=64)
  directory = str(root / 'tfds')
  previous = os.environ.get(fashion_mnist.IDX_DIR_ENV)
  os.environ[fashion_mnist.IDX_DIR_ENV] = idx
  try:
    assert data.num_examples('fashion_mnist', 'train', data_dir=directory) == 256  # prepares it
  finally:
    os.environ.pop(fashion_mnist.IDX_DIR_ENV) if previous is None else os.environ.update(
        {fashion_mnist.IDX_DIR_ENV: previous})
  return directory


def tiny_config(data_dir, family='mixer', **overrides):
  c = quickstart.get_config()
  c.model = dict(TINY[family], in_channels=1, dtype='float32')
  c.input.data_dir = data_dir
  c.input.batch_size = 32
  c.evals = {}
  c.total_epochs = None
  c.total_steps = 5
  c.log_every_steps = 1
  c.schedule.warmup_steps = 1
  for key, value in overrides.items():  # 'a.b': value sets c.a.b
    *parents, leaf = key.split('.')
    target = c
    for part in parents:
      target = target[part]
    target[leaf] = value
  return c


def batches(config, n):
  it = data.train_iter(config.input.dataset, config.input.split, pp=config.input.pp, global_batch_size=32,
                       seed=0, data_dir=config.input.data_dir)
  return [next(it) for _ in range(n)]


def run_steps(config, mesh_shape, devices, host_batches):
  """(per-step losses, final state) of the real train step on a mesh."""
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  model = trainer.build_model(config)
  tx, lr_fn = optim.make(config, models.abstract_variables(model)['params'], total_steps=10, warmup_steps=1)
  _, shardings = trainer.state_shardings(model, tx, mesh, config.sharding_rules)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0), shardings)
  step = trainer.make_train_step(model, tx, lr_fn, config, mesh, shardings)
  losses = []
  for batch in host_batches:
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(metrics['loss'])
  return np.asarray(jax.device_get(losses)), state


def assert_trees_close(a, b, atol):
  flat_a, flat_b = traverse_util.flatten_dict(jax.device_get(a)), traverse_util.flatten_dict(jax.device_get(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], atol=atol, rtol=0, err_msg=str(key))


@pytest.mark.slow
@pytest.mark.parametrize('family,extra', [
    # Randomness (stochastic depth, mixup) must not depend on the mesh. SGD: Mixer's token_mixing/Dense_1/bias
    # has an exactly zero gradient (the next LayerNorm removes a per-token constant), and Adam would turn its
    # rounding noise, which differs between meshes, into lr-sized steps.
    ('mixer', {'model.stoch_depth': 0.1, 'mixup.mixup_alpha': 0.2, 'optimizer': 'sgd',
               'optimizer_kw': {'momentum': 0.9}}),
    ('convmixer', {}),  # Adam; BatchNorm statistics over the global batch
])
def test_same_run_on_every_mesh(data_dir, family, extra):
  config = tiny_config(data_dir, family, **extra)
  host_batches = batches(config, 5)
  want_losses, want = run_steps(config, (1, 1, 1), jax.devices()[:1], host_batches)
  for mesh_shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    losses, state = run_steps(config, mesh_shape, jax.devices(), host_batches)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
    assert_trees_close(state.params, want.params, 1e-5)
    assert_trees_close(state.batch_stats, want.batch_stats, 1e-5)
    if mesh_shape == (1, 8, 1):  # FSDP really shards the parameters and the optimizer state
      kernel = state.params['head']['kernel']
      assert kernel.sharding.spec[0] == 'fsdp' and kernel.addressable_shards[0].data.shape[0] == 2


@pytest.mark.slow
def test_gradient_accumulation_equals_a_larger_batch(data_dir):
  config = tiny_config(data_dir, 'mixer')
  host_batches = batches(config, 2)
  want_losses, want = run_steps(config, (8, 1, 1), jax.devices(), host_batches)
  config.accum_steps = 4
  losses, state = run_steps(config, (8, 1, 1), jax.devices(), host_batches)
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  assert_trees_close(state.params, want.params, 1e-5)


@pytest.mark.slow
def test_tiny_model_learns_the_training_set(data_dir, tmp_path):
  """Also: `config.profile` traces exactly the steps it names, readable by TensorBoard and Perfetto."""
  config = tiny_config(data_dir, 'mixer', total_steps=120, log_every_steps=40, lr=0.01,
                       **{'profile.first_step': 50, 'profile.num_steps': 3})
  config.evals = {'train_eval': dict(split='train', pp=config.input.pp.replace('flip_lr|', ''))}
  metrics = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices())
  assert metrics['train_eval/top1'] >= 0.99 and metrics['train_eval/count'] == 256
  logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [m['step'] for m in logged if 'train/loss' in m] == [40, 80, 120]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  profiles = tmp_path / 'profile' / 'process_0' / 'plugins' / 'profile'  # TensorBoard's profile plugin layout
  (trace,) = os.listdir(profiles)
  files = os.listdir(profiles / trace)
  assert any(f.endswith('.xplane.pb') for f in files) and 'perfetto_trace.json.gz' in files
  with gzip.open(profiles / trace / 'perfetto_trace.json.gz') as f:
    events = json.load(f)['traceEvents']
  assert sorted(int(e['args']['step_num']) for e in events if e.get('name') == 'train') == [50, 51, 52]


@pytest.mark.parametrize('first_step,num_steps', [(-1, 2), (3, 0), (4, 2)])
def test_profile_outside_the_run_is_refused(first_step, num_steps):
  config = quickstart.get_config('steps=5')
  config.profile.first_step, config.profile.num_steps = first_step, num_steps
  with pytest.raises(ValueError, match='profile: first_step'):
    trainer.profile_steps(config, 5)


def test_fsdp_shards_the_optimizer_state_like_the_parameters():
  """Adam's moments sit under optax labels ('train' of multi_transform) yet take their parameter's sharding: under
  FSDP each device holds 1/N of them too (they were once left whole on every device)."""
  config = tiny_config(None, 'mixer')
  model = trainer.build_model(config)
  tx, _ = optim.make(config, models.abstract_variables(model)['params'], total_steps=10, warmup_steps=1)
  mesh = sharding.make_mesh((1, 8, 1), devices=jax.devices())
  _, shardings = trainer.state_shardings(model, tx, mesh, config.sharding_rules)
  kernel = ('MixerBlock_0', 'channel_mixing', 'Dense_0', 'kernel')
  spec = shardings.params[kernel[0]][kernel[1]][kernel[2]][kernel[3]].spec
  assert spec == jax.sharding.PartitionSpec('fsdp', None)
  moments = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
             if tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))[-4:] == kernel]
  assert moments == [spec, spec]  # mu and nu


def _flip_bytes(step_dir):
  """A few bytes inverted in the middle of the checkpoint's index file (a small state's arrays sit inline in it;
  silent corruption of a large array is tests/test_checkpoint_damage.py's)."""
  data = step_dir / 'default' / 'd'
  largest = max(data.iterdir(), key=lambda f: f.stat().st_size)
  with open(largest, 'r+b') as f:
    f.seek(largest.stat().st_size // 2)
    chunk = f.read(4)
    f.seek(-len(chunk), 1)
    f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.slow
def test_resume_past_a_damaged_checkpoint_logs_each_step_once(data_dir, tmp_path):
  """A run whose newest checkpoint is corrupt resumes from the one before, ends bit-identical to the run that was
  never damaged, and metrics.jsonl reads as one run (what the first run logged after step 4 is not repeated)."""
  config = tiny_config(data_dir, 'mixer', total_steps=6, checkpoint_every_steps=2, **{'checkpoint.keep': 3})
  config.evals = {'test': dict(split='test', pp=config.input.pp.replace('flip_lr|', ''))}
  workdir = tmp_path / 'run'
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices())
  straight = _final_params(str(workdir), data_dir, 6)
  logged = open(workdir / 'metrics.jsonl').read()
  _flip_bytes(workdir / 'checkpoints' / '6')
  trainer.train_and_evaluate(config, str(workdir), devices=jax.devices())
  assert os.listdir(workdir / 'checkpoints_damaged') == ['6']
  assert jax.tree.all(jax.tree.map(np.array_equal, _final_params(str(workdir), data_dir, 6), straight))
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in rows if 'test/top1' in r] == [6]
  same = lambda row: {k: v for k, v in row.items() if 'images_per_s' not in k}  # timings differ
  assert [same(r) for r in rows] == [same(json.loads(line)) for line in logged.splitlines()]


@pytest.mark.parametrize('resumed_at,evaluations_repeat,kept', [
    (4, False, [(2, 'train'), (2, 'test'), (4, 'train'), (4, 'test')]),  # evaluations at 4 ran after the save
    (4, True, [(2, 'train'), (2, 'test'), (4, 'train')]),  # a finished run evaluates at its last step again
    (0, False, []),
])
def test_metrics_jsonl_resumes_as_one_run(tmp_path, resumed_at, evaluations_repeat, kept):
  path = tmp_path / 'metrics.jsonl'
  rows = [(step, kind) for step in (2, 4, 6) for kind in ('train', 'test')]
  path.write_text(''.join(json.dumps({'step': s, f'{k}/loss': 1.0}) + '\n' for s, k in rows) + '{"step": 8, "tr')
  trainer._JsonlWriter(str(path), start_step=resumed_at, evaluations_repeat=evaluations_repeat).close()
  left = [json.loads(line) for line in path.read_text().splitlines()]  # the torn last line is gone too
  assert [(r['step'], *(k.split('/')[0] for k in r if k != 'step')) for r in left] == kept


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(data_dir, tmp_path):
  config = tiny_config(data_dir, 'mixer')
  model = trainer.build_model(config)
  tx, _ = optim.make(config, models.abstract_variables(model)['params'], total_steps=10, warmup_steps=1)

  def build(mesh_shape, devices):
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    return trainer.state_shardings(model, tx, mesh, config.sharding_rules)

  shapes, fsdp = build((1, 8, 1), jax.devices())
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(3), fsdp)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(7, state)
  ckpt.wait()
  for mesh_shape, devices in [((1, 1, 1), jax.devices()[:1]), ((4, 1, 2), jax.devices())]:
    _, target = build(mesh_shape, devices)
    restored = ckpt.restore(checkpoint.abstract_like(shapes, target))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(jax.device_get(a), jax.device_get(b)),
                                     restored, state))
    leaf = restored.params['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
    assert leaf.sharding == target.params['MixerBlock_0']['channel_mixing']['Dense_0']['kernel']
  # resuming with another optimizer (SGD's trace where Adam's mu/nu were saved) is refused in one line
  sgd, _ = optim.make(tiny_config(data_dir, 'mixer', optimizer='sgd'), models.abstract_variables(model)['params'],
                      total_steps=10, warmup_steps=1)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with pytest.raises(ValueError) as error:
    ckpt.restore(checkpoint.abstract_like(*trainer.state_shardings(model, sgd, mesh, config.sharding_rules)))
  message = str(error.value)
  assert '\n' not in message and message.startswith(f'checkpoint 7 in {ckpt.directory} holds a different train state')
  assert 'opt_state.inner_states.train.inner_state[1].mu' in message


def _train_py(workdir, data_dir, steps, *args, **popen):
  command = [sys.executable, 'train.py', f'--config=configs/quickstart.py:steps={steps}', f'--workdir={workdir}',
             f'--config.input.data_dir={data_dir}', '--config.input.batch_size=32',
             *[f'--config.model.{k}={v}' for k, v in TINY['mixer'].items() if k != 'name'],
             '--config.log_every_steps=1', '--config.schedule.warmup_steps=10', *args]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
  return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def _final_params(workdir, data_dir, steps, **overrides):
  config = tiny_config(data_dir, 'mixer', total_steps=steps, **overrides)
  model = trainer.build_model(config)
  # the optimizer only gives the state's shapes: its schedule does not matter here
  tx, _ = optim.make(config, models.abstract_variables(model)['params'], total_steps=steps, warmup_steps=1)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  shapes, shardings = trainer.state_shardings(model, tx, mesh, config.sharding_rules)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.latest_step() == steps
  state = jax.device_get(ckpt.restore(checkpoint.abstract_like(shapes, shardings)))
  ckpt.close()
  return state


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(data_dir, tmp_path):
  steps = 200
  straight = _train_py(tmp_path / 'straight', data_dir, steps,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  interrupted = tmp_path / 'interrupted'
  run = _train_py(interrupted, data_dir, steps, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
  for line in run.stdout:
    if f'step 5/{steps}' in line:
      run.send_signal(signal.SIGTERM)
      break
  output = run.stdout.read()
  assert run.wait(timeout=120) == 0 and 'stopped (preempted) at step' in output, output
  stopped_at = checkpoint.Checkpointer(str(interrupted), keep=2).latest_step()
  assert 5 <= stopped_at < steps
  resumed = _train_py(interrupted, data_dir, steps, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT)
  output = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0 and 'resumed from' in output and f'finished at step {steps}' in output, output
  assert straight.wait(timeout=300) == 0
  a, b = _final_params(str(tmp_path / 'straight'), data_dir, steps), _final_params(str(interrupted), data_dir, steps)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))  # bitwise
  rows = [json.loads(line) for line in open(interrupted / 'metrics.jsonl')]  # each step once across both processes
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, steps + 1))
  assert [r['step'] for r in rows if 'test/top1' in r] == [steps]


@pytest.mark.slow
def test_train_accuracy_counts_the_dominant_label_under_smoothing(data_dir):
  """Mixer's head starts at zero, so every first-step prediction is class 0: the accuracy is the share of
  class-0 examples, not 1 (with smoothed labels every class has a positive target)."""
  config = tiny_config(data_dir, 'mixer', label_smoothing=0.1)
  (batch,) = batches(config, 1)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = trainer.build_model(config)
  tx, lr_fn = optim.make(config, models.abstract_variables(model)['params'], total_steps=10, warmup_steps=1)
  _, shardings = trainer.state_shardings(model, tx, mesh, config.sharding_rules)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0), shardings)
  _, metrics = trainer.make_train_step(model, tx, lr_fn, config, mesh, shardings)(
      state, sharding.global_batch(batch, mesh))
  assert float(metrics['accuracy']) == pytest.approx(float((batch['labels'].argmax(-1) == 0).mean()))


def test_commands_restart_under_tcmalloc():
  """What train.py, eval.py and the benchmark call first: a restart with tcmalloc preloaded where it is installed
  (make test installs it as root), nothing where it is not or with the opt-out."""
  show_maps = 'from mixer_jax import cli; {}cli.preload_tcmalloc(); print(open("/proc/self/maps").read())'
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'MIXER_JAX_MALLOC')}
  maps = lambda setup='', **extra: subprocess.run(
      [sys.executable, '-c', show_maps.format(setup)], cwd=REPO, env=dict(env, **extra), capture_output=True,
      text=True, check=True).stdout
  installed = cli.find_tcmalloc()
  assert installed in maps() if installed else 'libtcmalloc' not in maps()
  assert 'libtcmalloc' not in maps(MIXER_JAX_MALLOC='system')
  assert 'libtcmalloc' not in maps('cli._TCMALLOC_GLOBS = (); ')  # as on a machine without it


@pytest.mark.slow
def test_resumed_fine_tuning_does_not_read_the_init_checkpoint(data_dir, tmp_path, monkeypatch):
  """The first start resolves the model from config.init (a Mixer pre-trained at half the resolution: 4x as many
  tokens, tokens_mlp_dim 8 -> 32) and records it in config.json; a resumed run builds the model from that record
  without reading the checkpoint and ends bit-identical to the uninterrupted run. The model scans its blocks: the
  per-block checkpoint is stacked into the train state, and the workdir reads back per block."""
  from mixer_jax import convert
  from mixer_jax.convert import npz
  options = {k: v for k, v in TINY['mixer'].items() if k != 'name'}
  source = models.create('mixer_s16', num_classes=5, in_channels=1, **{**options, 'image_size': 14})
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                        models.init_variables(source, jax.random.key(0))['params'])
  npz.write(params, str(tmp_path / 'pre.npz'))
  config = tiny_config(data_dir, 'mixer', total_steps=4, checkpoint_every_steps=2, init=str(tmp_path / 'pre.npz'),
                       **{'checkpoint.keep': 3, 'model.scan_blocks': True})
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  trainer.train_and_evaluate(config, str(straight), devices=jax.devices())
  trainer.train_and_evaluate(config, str(resumed), devices=jax.devices())
  assert json.load(open(resumed / 'config.json'))['init_overrides'] == {'tokens_mlp_dim': 32}
  shutil.rmtree(resumed / 'checkpoints' / '4')

  def unread(*args, **kwargs):
    raise AssertionError('a resumed run read config.init')
  monkeypatch.setattr(convert, 'load_for_finetuning', unread)
  metrics = trainer.train_and_evaluate(config, str(resumed), devices=jax.devices())
  assert metrics['step'] == 4 and not metrics['preempted']
  a, b = (_final_params(str(w), data_dir, 4, **{'model.tokens_mlp_dim': 32, 'model.scan_blocks': True})
          for w in (straight, resumed))
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert a.params['MixerBlock']['token_mixing']['Dense_0']['kernel'].shape == (2, 16, 32)
  architecture = {k: v for k, v in options.items() if k not in convert.CHECKPOINT_OPTIONS}
  per_block = convert.load(str(straight), 'mixer_s16', in_channels=1, **architecture)
  assert jax.tree.all(jax.tree.map(np.array_equal, per_block, models.unstack_blocks({'params': a.params}, 'mixer_s16')))
