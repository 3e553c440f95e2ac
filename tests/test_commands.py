"""The commands as a user meets them: --help everywhere (exit 0, the options with their defaults), a recipe's
arguments and resolved config without running it, short runs of any recipe, the installed commands from any
directory, and output made of the commands' own lines only (real processes, in a user's environment: no test
settings, libtpu installed, tcmalloc restarting the process)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import fake_data
import train
from configs import common
from mixer_jax import cli
from mixer_jax.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the environment's scripts: pip install -e . (make) puts ours there
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py') and f not in (
    '__init__.py', 'common.py'))


def _user_env(**extra) -> dict:
  """The environment of a user's shell: none of the settings the test run makes for itself."""
  test_settings = ('XLA_FLAGS', 'JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'TFDS_DATA_DIR', 'ALLOW_MULTIPLE_LIBTPU_LOAD',
                   'PYTHONPATH')
  env = {k: v for k, v in os.environ.items() if k not in test_settings and not k.startswith('TPU_')}
  return {**env, **extra}


def _run(command: list[str], cwd=REPO, **env) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=cwd, env=_user_env(**env), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('command,shows', [
    (['train.py', '--help'], ['Train (or resume)', '--workdir:', '--print_config', 'default: \'false\'']),
    (['eval.py', '--help'], ['Evaluate a checkpoint', '--checkpoint:', '--split:']),
    (['-m', 'mixer_jax.convert', '--help'], ['training workdir, the model its config.json records', '--model MODEL']),
    (['-m', 'mixer_jax.predict', '--help'], ['python -m mixer_jax.predict --checkpoint', '(default: 5)']),
    (['-m', 'mixer_jax.bench', '--help'], ['python -m mixer_jax.bench model --model', 'compile']),
    (['-m', 'mixer_jax.bench', 'model', '--help'], ['--batch BATCH', 'global batch (default: 32)']),
    (['train.py', '--config=configs/davit_i1k.py', '--help'], ['--workdir:', "variant='tiny'", 'epochs=300.0']),
])
def test_help_exits_0_with_the_options_and_their_defaults(command, shows):
  run = _run([sys.executable, *command])
  assert run.returncode == 0 and not run.stderr, run.stderr
  for text in shows:
    assert text in run.stdout


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'gpu_host.sh', 'slurm_per_node.sbatch', 'slurm_per_gpu.sbatch'])
def test_launch_scripts_explain_themselves(script):
  run = _run(['bash', f'scripts/{script}', '--help'])
  assert run.returncode == 0 and not run.stderr
  assert run.stdout.splitlines()[0][0].isupper() and f'scripts/{script}' in run.stdout  # the header, how to run it


@pytest.mark.parametrize('recipe', RECIPES)
def test_every_recipe_lists_its_arguments_with_their_defaults(recipe, capsys):
  with pytest.raises(SystemExit) as exit_:
    train.command(['train.py', f'--config=configs/{recipe}.py:help'])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert f'arguments of configs/{recipe}.py (--config=configs/{recipe}.py:key=value,...)' in out
  assert re.search(r'^  \w+=\S', out, re.M)  # name=default lines


def test_print_config_shows_what_would_run_and_runs_nothing(tmp_path, capsys):
  metrics = train.command(['train.py', '--config=configs/quickstart.py:model=convmixer', '--print_config',
                           '--config.total_steps=300', f'--workdir={tmp_path / "never"}'])
  out = capsys.readouterr().out
  assert metrics == {} and not (tmp_path / 'never').exists()
  assert 'name: convmixer_256_8' in out and 'total_steps: 300' in out and 'total_epochs: null' in out


@pytest.mark.parametrize('recipe,override,cleared', [
    ('quickstart', 'total_steps=300', 'total_epochs'),  # a short run of any recipe
    ('davit_i1k', 'schedule.warmup_steps=100', 'schedule.warmup_epochs'),
    ('mixer_i1k', 'total_examples=1000', 'total_epochs'),
])
def test_a_duration_given_on_the_command_line_replaces_the_recipe_s(recipe, override, cleared):
  config = cli.load_config([f'--config=configs/{recipe}.py', f'--config.{override}'])
  field, value = override.split('=')
  get = lambda path: config.get(path) if '.' not in path else config[path.split('.')[0]][path.split('.')[1]]
  assert get(field) == int(value) and get(cleared) is None


def test_the_duration_units_are_the_recipes():
  assert cli.DURATION_UNITS == common.DURATION_UNITS


def test_recipes_are_found_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.load_config(['--config=configs/quickstart.py:model=davit']).model.name == 'davit_tiny'
  (tmp_path / 'configs').mkdir()  # a recipe of the user's own, of the same name, comes first
  (tmp_path / 'configs' / 'quickstart.py').write_text(
      'from configs import common\n\ndef get_config():\n  c = common.base_config()\n  c.seed = 7\n  return c\n')
  assert cli.load_config(['--config=configs/quickstart.py']).seed == 7


@pytest.fixture
def user_dir(tmp_path):
  """A folder outside the repository with what the README's commands need: small Fashion-MNIST IDX files and two
  of its test images as PNG files."""
  idx = fake_data.fashion_mnist_like(str(tmp_path / 'idx'), train=40, test=20)
  for i, image in enumerate(fashion_mnist.read_idx(os.path.join(idx, fashion_mnist.FILES['test'][0]))[:2]):
    (tmp_path / f'{i}.png').write_bytes(tf.io.encode_png(image[:, :, None]).numpy())
  return tmp_path


# Lines that are not the commands' own: TensorFlow's and absl's C++ start-up notices, libtpu probing for a TPU,
# orbax's metadata warnings, absl messages logged before absl is set up, tracebacks, the parameter table.
FOREIGN = re.compile(r'oneDNN|cpu_feature_guard|absl::InitializeLog|InitGoogle|host bounds|TPU_|libtpu|'
                     r'Metadata file|WARNING:absl|Traceback|Generating|Shuffling|\+-{10}')
LOG_PREFIX = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ')
OURS = {f for d in ('.', 'mixer_jax', *(os.path.join('mixer_jax', p) for p in os.listdir(os.path.join(REPO, 'mixer_jax'))))
        if os.path.isdir(os.path.join(REPO, d)) for f in os.listdir(os.path.join(REPO, d)) if f.endswith('.py')}


def _own_lines_only(run: subprocess.CompletedProcess) -> None:
  assert run.returncode == 0, run.stderr
  for line in (run.stdout + run.stderr).splitlines():
    assert not FOREIGN.search(line), line
    prefix = LOG_PREFIX.match(line)
    assert prefix is None or prefix.group(1) in OURS, line


@pytest.mark.slow
def test_commands_print_their_own_lines_only_from_any_directory(user_dir):
  """The README's commands after the quickstart, run from outside the repository as installed commands (as
  `pip install -e .` sets them up) in a user's environment; the quickstart at 2 steps."""
  env = dict(FASHION_MNIST_IDX_DIR=str(user_dir / 'idx'), HOME=str(user_dir))  # ~/tensorflow_datasets is theirs
  python = sys.executable
  trained = _run([f'{BIN}/mixer-jax-train', '--config=configs/quickstart.py:steps=2,batch_size=8',
                  '--config.schedule.warmup_steps=1', '--workdir=workdirs/quickstart'], cwd=user_dir, **env)
  _own_lines_only(trained)
  assert trained.stderr.count('pre-flight:') == 1  # once, although tcmalloc restarts the process
  assert 'model mixer_s16 with channels_mlp_dim=256, hidden_dim=128, image_size=28, in_channels=1, num_blocks=4, ' \
         'patch_size=7, tokens_mlp_dim=64: 282,186 parameters' in trained.stderr
  assert 'preparing Fashion-MNIST in' in trained.stderr
  evaluated = _run([python, f'{REPO}/eval.py', '--checkpoint=workdirs/quickstart/'], cwd=user_dir, **env)
  _own_lines_only(evaluated)
  assert json.loads(evaluated.stdout)['evals']['test']['count'] == 20
  converted = _run([python, '-m', 'mixer_jax.convert', '--from=orbax', '--to=npz', '~/workdirs/quickstart',
                    'quickstart.npz'], cwd=user_dir, **env)
  _own_lines_only(converted)
  assert converted.stdout.startswith('wrote quickstart.npz (npz): mixer_s16, 282,186 parameters')
  predicted = _run([python, '-m', 'mixer_jax.predict', '--checkpoint=workdirs/quickstart', '0.png', '1.png'],
                   cwd=user_dir, **env)
  _own_lines_only(predicted)
  assert [line.split(':')[0] for line in predicted.stdout.splitlines()] == ['0.png', '1.png']
  api = _run([python, '-c', 'import jax\nimport numpy as np\nfrom mixer_jax import models\n'
              'model = models.create("mixer_s32", num_classes=10, image_size=64)\n'
              'variables = models.init_variables(model, jax.random.key(0))\n'
              'print(model.apply(variables, np.zeros((1, 64, 64, 3)))[0].shape)'], cwd=user_dir, **env)
  assert api.returncode == 0 and api.stdout == '(1, 10)\n' and api.stderr == '', api.stderr
  assert not np.isnan(json.loads(evaluated.stdout)['evals']['test']['loss'])
