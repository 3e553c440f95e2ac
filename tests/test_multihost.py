"""Multi-process jobs on one CPU machine: real train.py / eval.py processes with 4 simulated devices each,
gloo collectives and a coordinator on 127.0.0.1, against the same job as one 8-device process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import jax

import fake_data
from mixer_jax import checkpoint, data
from mixer_jax.data import fashion_mnist
from test_train import TINY, _final_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # real processes: make test only


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('fmnist')
  idx = fake_data.fashion_mnist_like(str(root / 'idx'), train=256, test=64)
  directory = str(root / 'tfds')
  os.environ[fashion_mnist.IDX_DIR_ENV] = idx
  try:
    assert data.num_examples('fashion_mnist', 'test', data_dir=directory) == 64  # prepares it
  finally:
    del os.environ[fashion_mnist.IDX_DIR_ENV]
  return directory


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(script_args, processes, *, heartbeat=None):
  """`processes` copies of a script (train.py args...), each with 8 // processes simulated devices."""
  port, runs = _free_port(), []
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={8 // processes} '
                                   '--xla_backend_optimization_level=0')
  for i in range(processes):
    command = [sys.executable, *script_args]
    if processes > 1:
      command += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}', f'--process_id={i}']
    if heartbeat:
      command.append(f'--heartbeat_timeout={heartbeat}')
    runs.append(subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT))
  return runs


def _train_args(workdir, data_dir, steps, *extra):
  return ['train.py', f'--config=configs/quickstart.py:steps={steps}', f'--workdir={workdir}',
          f'--config.input.data_dir={data_dir}', '--config.input.batch_size=32', '--config.log_every_steps=1',
          '--config.schedule.warmup_steps=2', '--config.input.split_per_process=False',
          *[f'--config.model.{k}={v}' for k, v in TINY['mixer'].items() if k != 'name'], *extra]


def _finish(runs, timeout=300):
  outputs = [run.communicate(timeout=timeout)[0] for run in runs]
  for run, output in zip(runs, outputs):
    assert run.returncode == 0, output
  return outputs


def _losses(workdir):
  return np.array([m['train/loss'] for m in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
                   if 'train/loss' in m])


@pytest.mark.parametrize('mesh', ['(-1,1,1)', '(1,-1,1)'], ids=['data_parallel', 'fsdp'])
def test_two_processes_train_like_one(tmp_path, data_dir, mesh):
  # SGD for the reason given in test_train.test_same_run_on_every_mesh (a bias with an exactly zero gradient)
  args = [f'--config.mesh.shape={mesh}', '--config.optimizer=sgd']
  one, two = tmp_path / 'one', tmp_path / 'two'
  outputs = _finish(_launch(_train_args(one, data_dir, 6, *args), 1) + _launch(_train_args(two, data_dir, 6, *args), 2))
  assert 'process 1 of 2; 4 local cpu device(s) of 8' in outputs[2]
  assert 'batch 32 global, 16 per process, 4 per data-parallel device' in outputs[1]
  np.testing.assert_allclose(_losses(two), _losses(one), atol=1e-5, rtol=0)
  # the 2-process checkpoint restores in this single process (8 devices) and equals the 1-process run's
  a, b = (_final_params(str(workdir), data_dir, 6, optimizer='sgd') for workdir in (one, two))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0), a.params, b.params)


def test_eval_across_two_processes_counts_every_example_once(tmp_path, data_dir):
  workdir = tmp_path / 'trained'
  _finish(_launch(_train_args(workdir, data_dir, 3), 1))
  args = ['eval.py', f'--checkpoint={workdir}', '--dataset=fashion_mnist', '--split=test[:61]',
          f'--data_dir={data_dir}', '--batch_size=8']
  _finish(_launch(args + [f'--output={tmp_path / "one.json"}'], 1))
  _finish(_launch(args + [f'--output={tmp_path / "two.json"}'], 2))  # process 0 writes it
  one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two.json'))
  assert two['devices'] == 8
  (one,), (two,) = one['evals'].values(), two['evals'].values()
  assert one['count'] == two['count'] == 61
  assert two['top1'] == pytest.approx(one['top1'], abs=1e-9)


def test_processes_with_different_configs_stop_at_pre_flight(tmp_path, data_dir):
  port = _free_port()
  runs = []
  for i, batch in enumerate((32, 64)):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    runs.append(subprocess.Popen(
        [sys.executable, *_train_args(tmp_path, data_dir, 4, f'--config.input.batch_size={batch}'),
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  for run in runs:
    output = run.communicate(timeout=300)[0]
    # one error line (gloo's C++ logging may land on the same line, after it: stdout and stderr are merged)
    errors = [line for line in output.splitlines() if line.startswith('error:')]
    assert run.returncode == 1 and len(errors) == 1 and errors[0].startswith(
        'error: processes disagree on global batch 32 (process 0), 64 (process 1): start every process with the '
        'same config'), output


def test_a_dead_process_stops_the_job_then_it_resumes(tmp_path, data_dir):
  steps = 60  # enough to outlast the kill at step 25: the survivor then blocks in the next collective
  args = _train_args(tmp_path, data_dir, steps, '--config.checkpoint_every_steps=10')
  first, second = _launch(args, 2, heartbeat=5)
  for line in first.stdout:
    if f'step 25/{steps}' in line:
      second.send_signal(signal.SIGKILL)
      killed_at = time.monotonic()
      break
  first.communicate(timeout=120)  # no silent hang: the survivor exits on its own
  assert first.returncode != 0 and time.monotonic() - killed_at < 120
  saved = checkpoint.Checkpointer(str(tmp_path), keep=2).latest_step()
  assert saved is not None and 10 <= saved < steps
  outputs = _finish(_launch(args, 2))
  assert 'resumed from' in outputs[0] and f'finished at step {steps}' in outputs[0]
