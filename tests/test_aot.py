"""Compiling for TPUs on this CPU machine (mixer_jax.aot, libtpu's compiler): tiny models of every family on
data-parallel, FSDP and tensor-parallel meshes of a TPU v3-8, what the compiled programs hold, the command,
its errors, the largest-batch search and the pod launcher's pre-launch check. Nothing runs on a TPU."""
import json
import os
import subprocess

import pytest

from configs import quickstart
from mixer_jax import aot, bench, flops, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = 'v3:2x2'  # a TPU v3-8: 8 cores
TINY = {  # widths divisible by the 4 tensor-parallel devices below
    'mixer': dict(name='mixer_s16', patch_size=8, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32,
                  channels_mlp_dim=256, image_size=32),
    'convmixer': dict(name='convmixer_256_8', dim=64, depth=2, kernel_size=3, patch_size=4, image_size=32),
    'davit': dict(name='davit_tiny', dims=(32, 64), depths=(1, 1), num_heads=(1, 2), image_size=32),  # 2 stages
}
MESHES = {'data': (-1, 1, 1), 'fsdp': (1, -1, 1), 'tensor': (-1, 1, 4)}
RESOLVED = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (2, 1, 4)}  # on the 8 cores of a v3-8
BATCH = 64


def tiny_config(family, mesh):
  c = quickstart.get_config()
  c.model = dict(TINY[family], dtype='bfloat16')
  c.input.batch_size = BATCH
  c.mesh.shape = MESHES[mesh]
  return c


@pytest.fixture(scope='module')
def reports():
  """Train-step reports by (family, mesh[, topology]), compiled once for the module."""
  cache = {}

  def get(family, mesh, topology=TOPOLOGY):
    if (family, mesh, topology) not in cache:
      cache[family, mesh, topology] = aot.compile_run(tiny_config(family, mesh), topology, steps=('train',))
    return cache[family, mesh, topology]
  return get


@pytest.mark.slow
@pytest.mark.parametrize('family', list(TINY))
def test_every_family_compiles_on_every_mesh(reports, family):
  params = {mesh: reports(family, mesh) for mesh in MESHES}
  for mesh, report in params.items():
    train = report['train']
    assert report['device_kind'] == 'TPU v3' and report['devices'] == 8 and train['fits']
    assert report['mesh'] == dict(zip(('data', 'fsdp', 'model'), RESOLVED[mesh]))
    assert 0 < train['step_gib'] < 16 and train['xla_gflops_per_device'] > 0 and train['roofline']['step_ms'] > 0
  data, fsdp = params['data']['train']['collectives'], params['fsdp']['train']['collectives']
  # data parallel: the gradients are all-reduced (in bfloat16 at least: 2 bytes a parameter), nothing is gathered
  grad_bytes = 2 * params['data']['parameters']
  assert data['all-reduce']['bytes'] >= grad_bytes and 'all-gather' not in data
  # FSDP: the (sharded) parameters are gathered before use, the gradients reduced
  assert fsdp['all-gather']['count'] >= 1 and fsdp['all-reduce']['count'] >= 1


@pytest.mark.slow
def test_fsdp_keeps_an_eighth_of_the_state_per_device():
  """Parameters and Adam moments per device (the step's arguments less its batch): FSDP over 8 devices holds
  1/8 of what data parallelism does. (Tiny widths would not show it: TPU arrays are padded to tiles of 128.)"""
  state = state_bytes_per_device(TOPOLOGY)
  # and a whole copy of the parameters with one channel dimension (sharding.py), which TPU pads to tiles: 5% of
  # this one-block model's state, next to nothing in a real one
  assert state['fsdp'] == pytest.approx(state['data'] / 8, rel=0.06)


def state_bytes_per_device(topology: str) -> dict:
  """{'data', 'fsdp'}: a Mixer's parameters and Adam moments per device (its train step's arguments less the batch)
  on 8 devices of the topology."""
  state = {}
  for mesh in ('data', 'fsdp'):
    c = tiny_config('mixer', mesh)
    c.model.update(hidden_dim=1024, channels_mlp_dim=2048, num_blocks=1, patch_size=16, tokens_mlp_dim=128)
    report = aot.compile_run(c, topology, steps=('train',))
    batch_bytes = BATCH // 8 * (32 * 32 * 3 + 10) * 4
    state[mesh] = report['train']['arguments_gib'] * 2**30 - batch_bytes
  return state


@pytest.mark.slow
@pytest.mark.parametrize('name,options,mode', [
    # the real widths at 224, one block: the analytic count leaves out norms and activations
    ('mixer_b16', dict(num_blocks=1), 'train'),
    ('convmixer_768_32', dict(depth=1), 'train'),  # XLA:TPU keeps the depthwise gradient depthwise
    ('davit_tiny', dict(depths=(1, 1, 1, 1), image_size=112), 'infer'),
])
def test_analytic_flops_match_xla_tpu_within_10_percent(name, options, mode):
  c = bench.bench_config(name, batch=8, dtype='bfloat16', model_options=options)
  kind = 'eval' if mode == 'infer' else 'train'
  step = aot.compile_run(c, TOPOLOGY, steps=(kind,))[kind]
  assert 0.9 <= step['xla_over_analytic'] <= 1.1, step['xla_over_analytic']
  model = models.create(name, num_classes=1000, **options)
  assert step['analytic_gflops_per_image'] == pytest.approx(flops.flops_per_image(model, mode) / 1e9)


@pytest.mark.slow
def test_command_prints_the_report_and_writes_json(tmp_path, capsys):
  jsonl = tmp_path / 'compile.jsonl'
  bench.main(['compile', '--config=configs/quickstart.py', f'--topology={TOPOLOGY}', '--jsonl', str(jsonl),
              f'--config.input.batch_size={BATCH}', '--config.mesh.shape=(1,-1,1)'])
  out = capsys.readouterr().out
  assert 'not a measurement' in out and 'train step:' in out and 'eval step:' in out and 'fits' in out
  (line,) = jsonl.read_text().splitlines()
  report = json.loads(line)
  assert report['config'][0] == '--config=configs/quickstart.py' and report['mesh'] == {'data': 1, 'fsdp': 8,
                                                                                          'model': 1}
  for step in (report['train'], report['eval']):
    bound = step['roofline']
    assert bound['step_ms'] == max(bound['compute_ms'], bound['memory_ms'])
    assert bound['compute_ms'] == pytest.approx(step['xla_gflops_per_device'] / 61.5e3 * 1e3)
    assert bound['images_per_s_per_device'] == pytest.approx(BATCH / 8 / (bound['step_ms'] / 1e3))
    assert step['step_gib'] == pytest.approx(step['arguments_gib'] + step['outputs_gib'] - step['aliased_gib']
                                             + step['temporaries_gib'], abs=1e-3)
  assert report['train']['aliased_gib'] > 0  # the state is donated


@pytest.mark.slow
def test_multi_slice_jobs_compile_over_every_slice():
  """config.mesh.dcn_shape: two v3-8 slices, the data axis across them (a hybrid ICI x DCN mesh)."""
  c = tiny_config('mixer', 'data')
  c.mesh.dcn_shape = (2, 1, 1)
  report = aot.compile_run(c, TOPOLOGY, steps=('train',))
  assert report['devices'] == 16 and report['mesh'] == {'data': 16, 'fsdp': 1, 'model': 1}
  assert report['train']['fits'] and report['batch_per_device'] == BATCH / 16


@pytest.mark.slow
def test_a_config_that_does_not_fit_is_refused(tmp_path, capsys):
  jsonl = tmp_path / 'compile.jsonl'
  with pytest.raises(SystemExit) as exit:
    bench.main(['compile', '--config=configs/quickstart.py', '--topology=v3-8', '--train_only', '--jsonl', str(jsonl),
                '--config.model.hidden_dim=8192', '--config.model.channels_mlp_dim=32768'])
  message = str(exit.value)
  assert message.startswith('error: the train step does not fit on v3-8 by ') and '\n' not in message
  train = json.loads(jsonl.read_text())['train']
  assert train['fits'] is False and train['over_gib'] > 0 and train['available_gib'] < 16
  assert 'RESOURCE_EXHAUSTED' in capsys.readouterr().out


@pytest.mark.parametrize('args,message', [
    (['--topology=v9:2x2'], "error: topology 'v9:2x2': unknown TPU generation 'v9'"),
    (['--topology=v3_8'], "error: topology 'v3_8': give <generation>:<chip grid>"),
    (['--topology=v3:3x5'], "error: topology 'v3:3x5': INVALID_ARGUMENT"),
    (['--topology=v3:2x2', '--config.mesh.shape=(3,-1,1)'], 'error: mesh shape (3, -1, 1): the fixed axes'),
    (['--topology=v3:2x2', '--config.model.name=mixer_b17'], "error: config.model.name = 'mixer_b17': unknown model (did you mean mixer_b16"),
    (['--topology=v3:2x2', '--config.input.batch_size=12'], 'error: batch_size 12 is not divisible by the 8'),
    (['--topology=v3:2x2', '--config.nope=1'], "error: --config.nope: config has no field 'nope'"),
])
def test_bad_input_is_one_line(args, message):
  with pytest.raises(SystemExit) as exit:
    bench.main(['compile', '--config=configs/quickstart.py', *args])
  assert str(exit.value).startswith(message) and '\n' not in str(exit.value), str(exit.value)


def test_accelerator_types_name_the_default_slices():
  assert aot.topology_name('v3-128') == ('v3', (8, 8))  # 128 cores, 64 chips
  assert aot.topology_name('v3-32') == ('v3', (4, 4))
  assert aot.topology_name('v4-8') == ('v4', (2, 2, 1))  # v4 types count TensorCores too
  assert aot.topology_name('v4-256') == ('v4', (4, 4, 8))
  assert aot.topology_name('v5p-128') == ('v5p', (4, 4, 4))
  assert aot.topology_name('v5litepod-16') == ('v5e', (4, 4))  # chips
  assert aot.topology_name('v6e-8') == ('v6e', (2, 4))
  assert aot.topology_name('v4:4x4x12') == ('v4', (4, 4, 12))
  with pytest.raises(ValueError, match='192 chips has no default slice shape'):
    aot.topology_name('v4-384')
  # megacore generations have a device per chip, the others per core
  assert len(aot.topology_devices('v4-8')) == 4 and len(aot.topology_devices('v3-8')) == 8


def test_out_of_memory_messages():
  assert aot.out_of_memory_gib('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
                               'temporaries (26.39G) exceeds available HBM (15.48G).') == (26.39, 15.48)
  assert aot.out_of_memory_gib('Ran out of memory in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm '
                               'capacity by 5.02G.') == (20.5, 15.48)
  assert aot.out_of_memory_gib('RESOURCE_EXHAUSTED: something else') is None


def test_batch_unit_is_what_the_mesh_and_the_recipes_groups_allow():
  import jax
  from mixer_jax import cli, sharding
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices())  # the 8 simulated CPU devices
  unit = lambda *args: aot.batch_unit(cli.load_config(list(args)), mesh)
  assert unit('--config=configs/quickstart.py') == 8
  assert unit('--config=configs/convmixer_i1k.py') == 64  # mixup's and BatchNorm's groups of 64
  assert unit('--config=configs/davit_i1k.py') == 128
  assert unit('--config=configs/convmixer_i1k.py', '--config.accum_steps=2') == 128  # BatchNorm per micro-batch
  assert unit('--config=configs/quickstart.py', '--config.accum_steps=3') == 24


@pytest.mark.parametrize('platform', ['tpu', 'gpu'])
def test_every_compile_table_row_names_a_valid_config_and_topology(platform):
  """BENCHMARKS.md's tables come from these rows (`bench compile-table`): a renamed recipe argument or field breaks
  them here, not in the next regeneration."""
  from mixer_jax import cli, compile_tables, gpus
  rows = compile_tables.ROWS[platform]
  assert sorted(sum((compile_tables.rows_of(platform, f'{i}/3') for i in range(3)), []), key=rows.index) == list(rows)
  for row in rows:
    config = cli.load_config(list(row.config))
    assert config.input.batch_size > 0
    assert gpus.is_gpu_topology(row.topology) == (platform == 'gpu')
    gpus.topology_name(row.topology) if platform == 'gpu' else aot.topology_name(row.topology)


def test_largest_batch_search():
  """On a memory curve that is not quite linear, the search ends at the exact largest multiple of the unit that
  fits, in a few tries, from below or from above."""
  need = lambda b: 1.0 + 0.006 * b + 2e-6 * b ** 2
  truth = max(b for b in range(8, 10_000, 8) if need(b) <= 16)
  for start in (64, 4096):
    calls = []
    best, tried = aot.search_max_batch(lambda b: (calls.append(b) or need(b) <= 16, need(b)), start=start, unit=8,
                                       capacity_gib=16)
    assert best == truth and len(calls) <= 10 and sorted(calls) == tried
    assert need(best + 8) > 16  # the next multiple was tried or is known not to fit
  assert aot.search_max_batch(lambda b: (False, 20.0), start=8, unit=8, capacity_gib=16) == (None, [8])


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` on PATH that logs its arguments and describes the slice as a v3-8."""
  log = tmp_path / 'gcloud.log'
  (tmp_path / 'bin').mkdir()
  script = tmp_path / 'bin' / 'gcloud'
  script.write_text(f'#!/bin/bash\necho "$@" >> {log}\n[[ "$*" == *"tpu-vm describe"* ]] && echo v3-8\nexit 0\n')
  script.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
  return env, log


@pytest.mark.slow
def test_pod_launcher_compiles_first_and_refuses_what_does_not_fit(fake_gcloud):
  env, log = fake_gcloud
  launch = lambda *args: subprocess.run(
      ['scripts/tpu_pod.sh', 'train', 'my-tpu', 'zone-a', '--config=configs/quickstart.py', '--workdir=gs://b/run',
       f'--config.input.batch_size={BATCH}', *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  ok = launch()
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'pre-launch check: compiling for my-tpu (v3-8)' in ok.stdout and 'fits' in ok.stdout
  calls = log.read_text().splitlines()
  assert calls[0].startswith('compute tpus tpu-vm describe my-tpu --zone zone-a')
  assert calls[1].startswith('compute tpus tpu-vm ssh my-tpu --zone zone-a --worker=all --command=cd ~/mixer_jax && '
                             '.venv/bin/python train.py --config=configs/quickstart.py --workdir=gs://b/run')
  log.write_text('')
  refused = launch('--config.model.hidden_dim=8192', '--config.model.channels_mlp_dim=32768')
  assert refused.returncode == 1 and 'not launched on my-tpu' in refused.stderr
  assert 'does not fit' in refused.stderr
  assert not any('ssh' in call for call in log.read_text().splitlines())  # nothing started on the pod
