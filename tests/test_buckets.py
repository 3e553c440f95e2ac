"""Workdirs in a bucket (gs://) against a Cloud Storage emulator on loopback (tests/gcs_emulator.py): the run's files
and checkpoints land in the bucket, a run killed mid-save or cut off from the bucket resumes to the uninterrupted
run's parameters, damaged and uncommitted steps are passed over, and a missing bucket or an endpoint that does not
answer is one line within seconds."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import jax
import tensorflow as tf

import gcs_emulator
import train
from mixer_jax import bench, checkpoint, convert, data, models, paths, trainer
from mixer_jax.convert import files
from test_checkpoint_damage import TINY_MIXER, _abstract, _assert_identical, _mesh, _save  # _save takes a URL
from test_multihost import _finish, _launch, _train_args
from test_train import REPO, _final_params, _train_py, data_dir  # noqa: F401 (data_dir: a fixture)

_BUCKETS = itertools.count()


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  server = gcs_emulator.Emulator(str(tmp_path_factory.mktemp('gcs')))
  yield server
  server.stop()


@pytest.fixture
def bucket(emulator, monkeypatch) -> str:
  """A new empty bucket, with this process's storage clients pointed at the emulator."""
  environment = emulator.environment()
  for name, value in {**environment, **paths.client_settings(environment)}.items():
    monkeypatch.setenv(name, value)
  return emulator.make_bucket(f'bucket-{next(_BUCKETS)}')


def test_checkpoints_in_a_bucket_commit_without_renaming_and_restore(bucket):
  saved = _save(f'{bucket}/run')
  files = paths.files(f'{bucket}/run/checkpoints')
  assert {'2/commit_success.txt', '4/commit_success.txt', '4/_CHECKPOINT_METADATA'} <= set(files)
  assert not [f for f in files if 'tmp' in f]
  ckpt = checkpoint.Checkpointer(f'{bucket}/run', keep=3)
  _assert_identical(ckpt.restore_newest(_abstract(saved[4], _mesh())), saved[4])


@pytest.mark.slow
def test_a_step_without_its_commit_marker_is_not_a_checkpoint(bucket):
  saved = _save(f'{bucket}/run')
  paths.at(f'{bucket}/run/checkpoints/4/commit_success.txt').unlink()  # a save cut short before its commit
  ckpt = checkpoint.Checkpointer(f'{bucket}/run', keep=3)
  assert ckpt.latest_step() == 2
  _assert_identical(ckpt.restore_newest(_abstract(saved[2], _mesh())), saved[2])


@pytest.mark.slow
def test_a_damaged_step_in_a_bucket_is_moved_aside_and_the_one_before_restored(bucket):
  saved = _save(f'{bucket}/run')
  needle = saved[4]['params']['dense']['kernel'][100].tobytes()[:16]
  for name in paths.files(f'{bucket}/run/checkpoints/4/default'):
    blob = paths.at(f'{bucket}/run/checkpoints/4/default/{name}')
    content = blob.read_bytes()
    if (at := content.find(needle)) >= 0:
      blob.write_bytes(content[:at] + bytes(b ^ 0x5A for b in needle[:8]) + content[at + 8:])
      break
  else:
    raise AssertionError('the kernel\'s bytes are in no object of step 4')
  ckpt = checkpoint.Checkpointer(f'{bucket}/run', keep=3)
  _assert_identical(ckpt.restore_newest(_abstract(saved[4], _mesh())), saved[2])
  assert ckpt.latest_step() == 2 and not paths.files(f'{bucket}/run/checkpoints/4')
  moved = paths.files(f'{bucket}/run/checkpoints_damaged/4')
  assert 'commit_success.txt' in moved and '_CHECKPOINT_METADATA' in moved


@pytest.mark.slow
def test_what_another_process_writes_is_listed_at_once(bucket):
  """Every host writes the same checkpoints folder: a listing never comes from a cache of an earlier one."""
  paths.at(f'{bucket}/run/checkpoints/1/x').write_text('')
  assert [p.name for p in paths.at(f'{bucket}/run/checkpoints').iterdir()] == ['1']
  subprocess.run([sys.executable, '-c', 'from mixer_jax import paths; paths.configure_clients(); '
                  f'paths.at("{bucket}/run/checkpoints/2/x").write_text("")'], cwd=REPO, check=True)
  assert sorted(p.name for p in paths.at(f'{bucket}/run/checkpoints').iterdir()) == ['1', '2']


def test_metrics_jsonl_in_a_bucket_resumes_as_one_run_and_keeps_every_line(bucket):
  path = f'{bucket}/run/metrics.jsonl'
  rows = [{'step': s, f'{k}/loss': 1.0} for s in (2, 4, 6) for k in ('train', 'test')]
  paths.at(path).write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 8, "tr')
  writer = trainer._JsonlWriter(path, start_step=4, evaluations_repeat=False)
  writer.write_scalars(5, {'train/loss': 0.5})
  writer.write_scalars(6, {'train/loss': 0.25})  # a bucket cannot append: each line rewrites the object
  writer.close()
  left = [json.loads(line) for line in paths.at(path).read_text().splitlines()]
  assert [r['step'] for r in left] == [2, 2, 4, 4, 5, 6] and left[-1] == {'step': 6, 'train/loss': 0.25}


@pytest.mark.slow
def test_checkpoint_files_in_a_bucket_are_read_from_a_verified_cache_and_written_there(bucket, tmp_path,
                                                                                          monkeypatch):
  monkeypatch.setenv('MIXER_JAX_CACHE', str(tmp_path / 'cache'))
  options = dict(patch_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=32)
  model = models.create('mixer_s16', num_classes=10, **options)
  variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(0)))
  url = f'{bucket}/weights/tiny.npz'
  convert.save(variables, url, 'mixer_s16', 'npz')  # written locally, then uploaded
  jax.tree.map(np.testing.assert_array_equal, convert.load(url, 'mixer_s16', **options), variables)
  cached = files.local(url)
  assert cached.startswith(str(tmp_path / 'cache')) and open(cached, 'rb').read() == paths.at(url).read_bytes()
  with open(cached, 'r+b') as f:  # a cached copy that no longer matches the object's MD5 is fetched again
    f.seek(100)
    f.write(b'\xff\xff')
  assert files.local(url) == cached and open(cached, 'rb').read() == paths.at(url).read_bytes()
  convert.save(variables, f'{bucket}/weights/tiny_orbax', 'mixer_s16', 'orbax')
  jax.tree.map(np.testing.assert_array_equal, convert.load(f'{bucket}/weights/tiny_orbax', 'mixer_s16', **options),
               variables)


@pytest.mark.slow
def test_datasets_in_a_bucket_are_read_there(bucket, data_dir, tmp_path):
  """A prepared tfds folder and an image folder, uploaded: read through TensorFlow's GCS client, as on a disk."""
  paths.upload_tree(data_dir, f'{bucket}/tfds')
  pp = 'decode|value_range(-1, 1)|onehot(10, key="label", key_result="labels")|keep("image", "labels")'
  local = data.eval_iter('fashion_mnist', 'test', pp=pp, global_batch_size=16, data_dir=data_dir)
  remote = data.eval_iter('fashion_mnist', 'test', pp=pp, global_batch_size=16, data_dir=f'{bucket}/tfds')
  assert data.num_examples('fashion_mnist', 'test', data_dir=f'{bucket}/tfds') == 64
  jax.tree.map(np.testing.assert_array_equal, next(iter(remote)), next(iter(local)))
  rng = np.random.default_rng(0)
  for split, count in (('train', 3), ('test', 2)):
    for c in ('cat', 'dog'):
      (tmp_path / 'photos' / split / c).mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        (tmp_path / 'photos' / split / c / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())
  paths.upload_tree(str(tmp_path / 'photos'), f'{bucket}/photos')
  source = data.sources.get(f'imagefolder:{bucket}/photos')
  assert source.class_names() == ['cat', 'dog'] and source.count('train') == 6
  images = [data.sources.get(f'imagefolder:{root}').load(r)['image'].numpy()
            for root in (f'{bucket}/photos', str(tmp_path / 'photos'))
            for r in data.sources.get(f'imagefolder:{root}').records('test').take(1)]
  assert images[0] == images[1]


def _one_line_exit(argv, within: float) -> str:
  start = time.time()
  with pytest.raises(SystemExit) as error:
    train.command(['train.py', *argv])
  assert time.time() - start < within
  message = str(error.value)
  assert '\n' not in message and 'Traceback' not in message
  return message


def test_one_retry_setting_bounds_every_client():
  tensorflow = paths.tensorflow_settings({paths.RETRIES_ENV: '3'})
  assert tensorflow['GCS_RETRY_CONFIG_MAX_RETRIES'] == '3'
  assert paths.tensorflow_settings({})['GCS_RETRY_CONFIG_MAX_RETRIES'] == str(paths.BUCKET_RETRIES)
  with pytest.raises(ValueError, match=r"^MIXER_JAX_BUCKET_RETRIES='two': give a whole number of retries >= 0"):
    paths.client_settings({paths.RETRIES_ENV: 'two'})
  assert paths.tensorflow_settings({paths.RETRIES_ENV: 'two'}) == {}  # reported by client_settings, not on import


@pytest.mark.parametrize('case,expected', [
    ('missing bucket', 'the bucket gs://{bucket}-missing does not exist: create it'),
    ('no answer', 'no answer from http://127.0.0.1:'),
    ('no credentials', 'no Google Cloud credentials on this machine: run `gcloud auth application-default login`'),
])
def test_a_bucket_that_cannot_be_used_is_one_line_before_anything_runs(bucket, monkeypatch, data_dir, case,
                                                                         expected):
  workdir = f'{bucket}-missing/run' if case == 'missing bucket' else f'{bucket}/run'
  if case == 'no answer':
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{gcs_emulator._free_port()}')
  if case == 'no credentials':  # Google's endpoint, with a credentials file that is not there: no request is made
    monkeypatch.delenv('STORAGE_EMULATOR_HOST')
    monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', '/nonexistent/key.json')
  message = _one_line_exit(['--config=configs/quickstart.py', f'--workdir={workdir}',
                            f'--config.input.data_dir={data_dir}'], within=15)
  assert message.startswith(f'error: --workdir {workdir}: {expected.format(bucket=bucket[5:])}'), message


def _run_until(run, line: str) -> list[str]:
  """The run's output up to its first line containing `line`."""
  output = []
  for text in run.stdout:
    output.append(text)
    if line in text:
      return output
  raise AssertionError(f'the run ended before {line!r}:\n' + ''.join(output))


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_or_cut_off_mid_save_resumes_to_the_uninterrupted_run(emulator, bucket, data_dir,
                                                                                       tmp_path, monkeypatch):
  """Saving every step, SIGKILL lands during a save; the restarted run resumes from the newest committed step. Then
  the bucket stops answering during a save: the run ends with one line naming the step to resume from, and once the
  bucket answers again the same command resumes from that step and ends bitwise equal to a local run never stopped.
  metrics.jsonl, config.json and TensorBoard's events are in the bucket; nothing is written to a local folder named
  like the URL."""
  steps, workdir = 30, f'{bucket}/run'
  straight = _train_py(tmp_path / 'straight', data_dir, steps, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  run = _train_py(workdir, data_dir, steps, '--config.checkpoint_every_steps=1', **pipe)
  output = _run_until(run, f'step 10/{steps}')
  run.send_signal(signal.SIGKILL)
  assert run.wait(timeout=60) == -signal.SIGKILL, ''.join(output)
  killed_at = checkpoint.Checkpointer(workdir, keep=2).latest_step()
  assert killed_at is not None and killed_at < steps

  monkeypatch.setenv(paths.RETRIES_ENV, '1')  # gives up within a minute (gcsfs's own 6 tries take half of it)
  run = _train_py(workdir, data_dir, steps, '--config.checkpoint_every_steps=1', **pipe)
  output = _run_until(run, f'step 20/{steps}')
  emulator.gate.close()
  t0 = time.time()
  output += run.communicate(timeout=180)[0].splitlines(keepends=True)
  emulator.gate.open()
  assert run.returncode == 1 and time.time() - t0 < 150, ''.join(output)
  assert f'resumed from {workdir}/checkpoints at step {killed_at}' in ''.join(output)
  cut_off_at = checkpoint.Checkpointer(workdir, keep=2).latest_step()
  assert 20 - 2 <= cut_off_at < steps  # saves are asynchronous: the one under way and the next can be lost
  error = [line for line in output if not line.startswith(('I1', 'W1'))][-1]  # after absl's log lines
  assert re.match(rf'error: (checkpoint {cut_off_at + 1}|metrics) could not be written to {workdir} \(', error), error
  assert error.rstrip().endswith(f'run the same command to resume from step {cut_off_at}'), error
  assert not any(text in ''.join(output) for text in ('Traceback', 'Event loop is closed')), ''.join(output)
  monkeypatch.delenv(paths.RETRIES_ENV)

  resumed = _train_py(workdir, data_dir, steps, '--config.checkpoint_every_steps=1', **pipe)
  output = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0 and f'resumed from {workdir}/checkpoints at step {cut_off_at}' in output, output
  assert f'finished at step {steps}' in output, output
  assert straight.wait(timeout=300) == 0
  a, b = _final_params(str(tmp_path / 'straight'), data_dir, steps), _final_params(workdir, data_dir, steps)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))  # bitwise
  rows = [json.loads(line) for line in paths.at(f'{workdir}/metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, steps + 1))
  files = paths.files(workdir)
  assert 'config.json' in files and any(f.startswith('events.out.tfevents') for f in files)
  assert not (tmp_path / 'gs:').exists() and not os.path.exists('gs:')
  # eval.py reads the run's config and newest checkpoint from the bucket and evaluates as the run did
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
  evaluated = subprocess.run([sys.executable, 'eval.py', f'--checkpoint={workdir}', f'--output={tmp_path / "r.json"}'],
                             cwd=REPO, env=env, capture_output=True, text=True)
  assert evaluated.returncode == 0, evaluated.stderr
  results = json.load(open(tmp_path / 'r.json'))['evals']['test']
  assert results['top1'] == next(r['test/top1'] for r in rows if 'test/top1' in r)


@pytest.mark.slow
def test_checkpoint_benchmark_compares_a_disk_and_a_bucket_and_leaves_nothing_in_them(bucket, tmp_path, capsys):
  jsonl, disk = tmp_path / 'bench.jsonl', tmp_path / 'disk'
  disk.mkdir()
  bench.main(['checkpoint', '--model', 'mixer_s32', '--model_options', TINY_MIXER, '--batch', '8', '--storage_only',
              '--saves', '2', '--workdir', str(disk), '--workdir', f'{bucket}/bench', '--jsonl', str(jsonl)])
  out = capsys.readouterr().out
  assert f'{bucket}/bench: 2 saves' in out and "the first's" in out, out
  row = json.loads(jsonl.read_text())
  assert [s['storage'] for s in row['storages']] == [str(disk), f'{bucket}/bench'] and 'step_s' not in row
  for storage in row['storages']:
    assert 0 < storage['save_blocking_s'] < storage['commit_s'] and storage['restore_s'] > 0
  first, bucketed = row['storages']
  assert bucketed['commit_s_ratio'] == pytest.approx(bucketed['commit_s'] / first['commit_s'])
  assert paths.files(bucket) == [] and os.listdir(disk) == []


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_in_a_bucket_that_one_process_resumes(bucket, data_dir):
  workdir = f'{bucket}/run'
  _finish(_launch(_train_args(workdir, data_dir, 6, '--config.checkpoint_every_steps=3'), 2))
  assert checkpoint.Checkpointer(workdir, keep=2).latest_step() == 6
  written = paths.files(f'{workdir}/checkpoints/6')
  assert {f.split('/')[1] for f in written if f.startswith('default/ocdbt.process_')} == {
      'ocdbt.process_0', 'ocdbt.process_1'}  # each process wrote its own shards of the one checkpoint
  output, = _finish(_launch(_train_args(workdir, data_dir, 9), 1))
  assert 'resumed from' in output and 'finished at step 9' in output
  rows = [json.loads(line) for line in paths.at(f'{workdir}/metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, 10))
