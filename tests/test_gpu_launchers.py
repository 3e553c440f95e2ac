"""The GPU launchers' pre-launch check (scripts/gpu_host.sh and the SLURM scripts): the real scripts as processes,
with a fake nvidia-smi naming the machine's GPUs and a fake srun that logs what it would start. The compiles are
real (XLA:GPU's compiler on the CPU); nothing trains."""
import os
import subprocess

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FITS = ['--config=configs/quickstart.py', '--config.input.batch_size=64']
# 2.1 billion parameters: 32 GiB per A100 (of the 30 GiB JAX may use), in data parallel
TOO_LARGE = [*FITS, '--config.model.hidden_dim=8192', '--config.model.channels_mlp_dim=32768']
H100 = 'NVIDIA H100 80GB HBM3'


def _path_without(command: str) -> list[str]:
  """PATH's folders, less any holding a real `command` (where the tests run on a GPU machine)."""
  return [d for d in os.environ['PATH'].split(os.pathsep) if d and not os.access(os.path.join(d, command), os.X_OK)]


@pytest.fixture
def machine(tmp_path):
  """(run, srun_log): run(script, *args, nvidia_smi=True, **env) runs a launcher, with `--workdir` added, as it would
  run on a node of 8 H100s (nvidia_smi=False: on a machine without nvidia-smi), SLURM's batch script included;
  SLURM's, CUDA's and the launchers' variables come from `env` only."""
  srun_log = tmp_path / 'srun.log'
  fakes = {'bin': ('srun', f'#!/bin/bash\necho "$@" >> {srun_log}\n'),
           'smi': ('nvidia-smi', f'#!/bin/bash\nfor i in 1 2 3 4 5 6 7 8; do echo "{H100}"; done\n')}
  for folder, (name, text) in fakes.items():
    (tmp_path / folder).mkdir()
    (tmp_path / folder / name).write_text(text)
    (tmp_path / folder / name).chmod(0o755)
  # a file: train.py, if it were started by mistake, would stop at once on this workdir
  workdir = tmp_path / 'not_a_workdir'
  workdir.write_text('')
  ours = ('SLURM_', 'GPU', 'CUDA_VISIBLE', 'PRELAUNCH')

  def run(script, *args, nvidia_smi=True, **env):
    path = [str(tmp_path / 'bin'), *([str(tmp_path / 'smi')] if nvidia_smi else []), *_path_without('nvidia-smi')]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith(ours)}, PATH=os.pathsep.join(path),
               SLURM_SUBMIT_DIR=REPO, **env)
    command = ['bash', os.path.join(REPO, 'scripts', script), *args, f'--workdir={workdir}']
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

  return run, srun_log


def srun_calls(srun_log):
  return srun_log.read_text().splitlines() if srun_log.exists() else []


@pytest.mark.slow
def test_gpu_host_check_compiles_for_the_visible_gpus(machine):
  run, _ = machine
  ok = run('gpu_host.sh', 'check', *FITS, CUDA_VISIBLE_DEVICES='0,3')  # JAX sees 2 of the 8 GPUs nvidia-smi lists
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert f"pre-launch check: compiling for {H100}:1x2 on this machine's CPU" in ok.stdout
  assert f'on {H100}:1x2: 2 x {H100}' in ok.stdout  # the report
  assert 'train step: compiled' in ok.stdout and 'eval step: compiled' in ok.stdout
  assert ok.stdout.rstrip().endswith(f'pre-launch check: the train step fits on {H100}:1x2')


@pytest.mark.slow
def test_slurm_per_node_checks_once_then_starts_srun(machine):
  run, srun_log = machine
  ok = run('slurm_per_node.sbatch', *FITS, SLURM_NNODES='2')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert f'pre-launch check: the train step fits on {H100}:2x8' in ok.stdout
  assert 'global batch 64 (4 per device)' in ok.stdout  # 2 hosts of 8
  [call] = srun_calls(srun_log)
  assert call.startswith('.venv/bin/python train.py --local_device_ids=0,1,2,3,4,5,6,7 ' + ' '.join(FITS) +
                         ' --workdir=')


@pytest.mark.slow
def test_slurm_per_gpu_refuses_what_does_not_fit(machine):
  run, srun_log = machine
  refused = run('slurm_per_gpu.sbatch', *TOO_LARGE, SLURM_JOB_NUM_NODES='1', GPU='a100-40gb')  # GPU= beats nvidia-smi
  assert refused.returncode == 1
  assert 'pre-launch check: compiling for a100-40gb:1x8' in refused.stdout
  *_, error, message = refused.stderr.strip().splitlines()
  assert error.startswith('error: the train step does not fit on a100-40gb:1x8')
  assert message == ('not started: a100-40gb:1x8 fails the pre-launch check (the error above; PRELAUNCH_CHECK=0 '
                     'skips it)')
  assert srun_calls(srun_log) == []


@pytest.mark.slow
def test_gpu_host_refuses_a_gpu_it_cannot_compile_for(machine):
  run, _ = machine
  refused = run('gpu_host.sh', *FITS, GPU='NVIDIA L4')
  assert refused.returncode == 1
  *_, error, message = refused.stderr.strip().splitlines()
  assert error.startswith("error: GPU 'NVIDIA L4' has no description here")
  assert message.startswith('not started: NVIDIA L4:1x8 fails the pre-launch check')
  assert 'is a file' not in refused.stderr  # train.py never started


def test_without_nvidia_smi_the_gpu_must_be_named_or_the_check_skipped(machine):
  run, srun_log = machine
  for script in 'gpu_host.sh', 'slurm_per_gpu.sbatch':
    refused = run(script, *FITS, nvidia_smi=False, SLURM_NNODES='2')
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == ['no nvidia-smi here to name the GPU: set GPU=<name> (a100-40gb, a100-80gb, '
                                           'h100, h200, a3-highgpu-8g, ...)']
  refused = run('gpu_host.sh', 'check', *FITS, nvidia_smi=False, GPU='h100')
  assert refused.returncode == 1
  assert refused.stderr.splitlines() == ['no nvidia-smi here to count the GPUs: set GPUS_PER_HOST=<n>']
  assert srun_calls(srun_log) == []
  skipped = run('slurm_per_node.sbatch', *FITS, nvidia_smi=False, SLURM_NNODES='2', PRELAUNCH_CHECK='0')
  assert skipped.returncode == 0 and skipped.stdout == ''
  assert srun_calls(srun_log)[0].startswith('.venv/bin/python train.py --local_device_ids=0,1,2,3,4,5,6,7 --config=')
