"""Every command the documentation gives runs as written.

The commands are the lines of the ```sh blocks of README.md and docs/*.md (a trailing `\\` continues a line; `#`
starts a comment). Each must match one rule of COMMANDS, which says how the test runs it:
  RUN       as written, from a folder outside the repository that holds what the docs' reader would have by then
            (the quickstart's workdir, an image of their own), with the rule's arguments appended where it trains
            or benchmarks (absl and argparse take the last value of a flag): a short run, not hours. A workdir it
            trains is then evaluated by eval.py, which must give the run's final evaluation exactly;
  STOPS     as written: it must stop with the one-line error the rule names (the checkpoint to download, the
            dataset to prepare): everything before that point (flags, recipe, model names) is valid;
  NOT_HERE  not run, for the reason given (a TPU, a GPU cluster, a cloud account, or hours).
A command no rule matches fails the suite, and so does a rule no command matches: a renamed flag, module or recipe
cannot hide. Commands run in this process (train.command, eval.command, the modules' main), `make` targets as
processes; the Fashion-MNIST they find is a small one written here.
"""
import contextlib
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import eval as eval_py
import fake_data
import train
from mixer_jax import bench, predict
from mixer_jax.convert import __main__ as convert_main
from mixer_jax.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, 'README.md'), *sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))]
RUN, STOPS, NOT_HERE = 'run', 'stops', 'not here'
METRICS = ('top1', 'top5', 'loss', 'count')
SHORT = ('--config.total_steps=2', '--config.schedule.warmup_steps=1', '--config.input.batch_size=8')
TINY_BENCH = ('--batch', '8', '--steps', '1', '--repeats', '1', '--warmup', '0', '--model_options', 'num_blocks=1')

# (regex matched at the start of a command, kind, what: the arguments appended / the error's fragment / why not)
COMMANDS = [
    (r'make quickstart$', RUN, ('--workdir={root}/workdirs/make_quickstart', *SHORT)),  # make runs in the repository
    (r'make test(-fast)?$', NOT_HERE, 'the test suite itself'),
    (r'make gpu-compiler$', NOT_HERE, 'installs XLA:GPU\'s compiler, as make test does before this suite runs'),
    (r'make bench$', NOT_HERE, 'full-size models at 224 on the CPU: many minutes; BENCHMARKS.md holds its output'),
    (r'source \.venv/bin/activate$', NOT_HERE, 'the shell the commands run in; this test runs them with that Python'),
    (r'python train\.py --config=configs/quickstart\.py', RUN, SHORT),
    (r'python train\.py --config=configs/finetune\.py.*init=Mixer-B_16\.npz', STOPS,
     "Mixer-B_16.npz': no such checkpoint file or workdir: download it from gs://mixer_models/"),
    (r'python train\.py --config=configs/finetune\.py:model=davit_tiny,dataset=imagefolder:~/photos', STOPS,
     '/photos does not exist'),
    (r'python eval\.py --checkpoint=workdirs/quickstart', RUN, ()),
    (r'python eval\.py --checkpoint=Mixer-B_16\.npz', STOPS, 'Mixer-B_16.npz: no such checkpoint file or directory: '
                                                            'download it from gs://mixer_models/imagenet1k/'),
    (r'python eval\.py --checkpoint=davit_tiny\.safetensors', STOPS,
     'davit_tiny.safetensors: no such checkpoint file or directory: download it from https://huggingface.co/timm/'),
    (r'python eval\.py --checkpoint=WORKDIR', STOPS, 'WORKDIR: no such checkpoint file or directory'),
    (r'python -m mixer_jax\.predict --checkpoint=workdirs/quickstart', RUN, ()),
    (r'python -m mixer_jax\.convert --from orbax --to npz workdirs/quickstart', RUN, ()),
    (r'python -m mixer_jax\.convert --from npz', STOPS, 'Mixer-B_16.npz: no such checkpoint file or directory'),
    (r'python -m mixer_jax\.convert --from timm', STOPS, 'davit_tiny.pth.tar: no such checkpoint file or directory'),
    (r'python -m mixer_jax\.bench model', RUN, TINY_BENCH),
    (r'python -m mixer_jax\.bench compile', NOT_HERE, 'a full-size XLA:TPU or XLA:GPU compile takes minutes; '
                                                      'tests/test_aot.py and tests/test_aot_gpu.py run the same '
                                                      'command on tiny models'),
]


def doc_commands(path: str) -> list[str]:
  """The commands of the ```sh blocks of a Markdown file."""
  with open(path) as f:
    text = f.read()
  commands = []
  for block in re.findall(r'^```sh\n(.*?)^```', text, re.S | re.M):
    for line in re.sub(r'\\\n\s*', '', block).splitlines():
      line = re.sub(r'(^|\s+)#.*$', '', line).strip()
      if line:
        commands.append(line)
  return commands


ALL = [(os.path.relpath(path, REPO), command) for path in DOCS for command in doc_commands(path)]


def _matching(command: str) -> list:
  return [r for r in COMMANDS if re.match(r[0], command)]


def rule(command: str):
  matching = _matching(command)
  assert len(matching) == 1, f'{command!r}: {len(matching)} rules match it; give it exactly one in COMMANDS'
  return matching[0]


def test_every_command_has_a_rule_and_every_rule_a_command():
  for _, command in ALL:
    rule(command)
  unused = [pattern for pattern, *_ in COMMANDS if not any(re.match(pattern, c) for _, c in ALL)]
  assert not unused, f'rules for commands the docs no longer give: {unused}'


@pytest.fixture(scope='module')
def reader(tmp_path_factory):
  """A folder outside the repository, as the docs' reader has it after `make quickstart`: small Fashion-MNIST IDX
  files (the package's stand-in), a prepared tfds folder, the quickstart's workdir and an image of their own."""
  root = tmp_path_factory.mktemp('reader')
  env = {fashion_mnist.IDX_DIR_ENV: fake_data.fashion_mnist_like(str(root / 'idx'), train=40, test=20),
         'TFDS_DATA_DIR': str(root / 'tfds')}
  with _inside(root, env):
    train.command(['train.py', '--config=configs/quickstart.py', '--workdir=workdirs/quickstart', *SHORT])
  (root / 'my_image.png').write_bytes(tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy())
  return root, env


@contextlib.contextmanager
def _inside(folder, env):
  old_cwd, old_env = os.getcwd(), dict(os.environ)
  os.chdir(folder)
  os.environ.update(env)
  try:
    yield
  finally:
    os.chdir(old_cwd)
    os.environ.clear()
    os.environ.update(old_env)


IN_PROCESS = {  # the command's first words -> its entry point, given argv without them
    ('python', 'train.py'): lambda argv: train.command(['train.py', *argv]),
    ('python', 'eval.py'): lambda argv: eval_py.command(['eval.py', *argv]),
    ('python', '-m', 'mixer_jax.convert'): convert_main.main,
    ('python', '-m', 'mixer_jax.predict'): predict.main,
    ('python', '-m', 'mixer_jax.bench'): bench.main,
}


def _execute(command: str, extra: tuple, root, env) -> str | None:
  """Runs `command` with `extra` appended; returns the one-line error it stopped with, or None."""
  words = shlex.split(command)
  if words[0] == 'make':
    run = subprocess.run(['make', '-s', '-C', REPO, *words[1:], f'ARGS={shlex.join(extra)}'], cwd=root,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return None
  entry = next((fn for start, fn in IN_PROCESS.items() if tuple(words[:len(start)]) == start), None)
  assert entry is not None, f'{command}: no way to run it here'
  start = next(start for start in IN_PROCESS if tuple(words[:len(start)]) == start)
  with _inside(root, env):
    try:
      entry([*words[len(start):], *extra])
    except SystemExit as exit_:
      if exit_.code not in (0, None):
        return str(exit_.code)
  return None


# (a command without its one rule stays here, and fails below as in the test above)
RUNNABLE = [(doc, command) for doc, command in ALL if [r[1] for r in _matching(command)] != [NOT_HERE]]


@pytest.mark.slow
@pytest.mark.parametrize('doc,command', RUNNABLE, ids=[f'{doc}: {command[:60]}' for doc, command in RUNNABLE])
def test_doc_command_runs_as_written(doc, command, reader):
  _, kind, what = rule(command)
  root, env = reader
  extra = tuple(arg.format(root=root) for arg in what) if kind == RUN else ()
  error = _execute(command, extra, root, env)
  if kind == RUN:
    assert error is None, error
    workdirs = [w.partition('=')[2] for w in (*shlex.split(command), *extra) if w.startswith('--workdir=')]
    if workdirs and os.path.exists(os.path.join(root, workdirs[-1], 'metrics.jsonl')):
      _evaluates_as_the_run(os.path.join(root, workdirs[-1]), root, env)
  else:
    assert error is not None and error.startswith('error: ') and '\n' not in error.strip(), error
    assert what in error, error


def _evaluates_as_the_run(workdir: str, root, env) -> None:
  """eval.py on a workdir the docs' commands trained gives the run's own final evaluation, exactly: the run's model,
  pre-processing, data and batch come from its config.json (every family's quickstart passes through here)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  final = {k: v for row in rows if row['step'] == rows[-1]['step'] for k, v in row.items()}
  with _inside(root, env):
    results = eval_py.command(['eval.py', f'--checkpoint={workdir}'])
  for name, evaluation in results['evals'].items():
    assert {k: evaluation[k] for k in METRICS} == {k: final[f'{name}/{k}'] for k in METRICS}, name
