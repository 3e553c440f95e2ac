"""Every bad input to train.py and the benchmark ends in one line, `error: <what is wrong>: <how to fix it>`, with
exit status 1, before any data are read or anything compiled (eval.py and the converter:
test_bad_inputs_eval_convert.py). The commands run in-process (their own flag parsing and error handling), and a
few through real processes, where the status and stderr are the user's."""
import os
import re
import subprocess
import sys

import pytest

import train
from configs import quickstart
from mixer_jax import bench, config_checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = '--config=configs/quickstart.py:steps=300'
BAD_RECIPES = {  # file name -> source
    'syntax.py': 'def get_config(:\n',
    'no_get_config.py': 'x = 1\n',
    'returns_dict.py': 'def get_config(arg=None):\n  return {"lr": 1}\n',
    'raises.py': 'def get_config(arg=None):\n  return 1 / 0\n',
}

# (train.py arguments after --workdir, a fragment the message must hold). {tmp}: a folder of this test's, holding
# BAD_RECIPES and a regular file `file`.
TRAIN_CASES = [
    # overrides of fields the config lacks, near and far from real names
    ((QUICK, '--config.lrr=0.1'), "--config.lrr: config has no field 'lrr' (did you mean --config.lr?)"),
    ((QUICK, '--config.input.batchsize=32'), 'did you mean --config.input.batch_size?'),
    ((QUICK, '--config.nonexistent=1'), "config has no field 'nonexistent'"),
    ((QUICK, '--config.evals.val.split=x'), "config.evals has no field 'val' (config.evals has test)"),
    ((QUICK, '--config.mesh.shape.x=1'), 'config.mesh.shape is a value, not a group of fields'),
    ((QUICK, '--config.checkpoint.kep=3'), 'did you mean --config.checkpoint.keep?'),
    # malformed values
    ((QUICK, '--config.input.batch_size=abc'), '--config.input.batch_size=abc'),
    ((QUICK, '--config.lr=abc'), '--config.lr=abc'),
    ((QUICK, '--config.checkpoint.async_save=maybe'), '--config.checkpoint.async_save'),
    # recipes that cannot be loaded
    (('--config=configs/nonexistent.py',), "no recipe file 'configs/nonexistent.py' (recipes: configs/"),
    (('--config={tmp}/syntax.py',), 'syntax.py line 1: invalid syntax'),
    (('--config={tmp}/no_get_config.py',), 'defines no get_config(arg) function'),
    (('--config={tmp}/returns_dict.py',), 'get_config returned dict, not an ml_collections ConfigDict'),
    (('--config={tmp}/raises.py',), 'ZeroDivisionError: division by zero'),
    (('--config=configs/quickstart.py:foo=1',), "unknown config argument 'foo'"),
    (('--config=configs/quickstart.py:model=resnet',), "unknown quickstart model 'resnet'"),
    (('--config=configs/quickstart.py:epochs=abc',), "epochs='abc' is not a float"),
    (('--config=configs/finetune.py:model=mixer_s32,dataset=imagefolder:/nonexistent',),
     'image folder /nonexistent does not exist'),
    # zero or negative intervals, sizes, counts and durations
    ((QUICK, '--config.checkpoint_every_steps=0'), 'config.checkpoint_every_steps = 0: must be an integer > 0'),
    ((QUICK, '--config.checkpoint_every_steps=-5'), 'config.checkpoint_every_steps = -5'),
    ((QUICK, '--config.log_every_steps=0'), 'config.log_every_steps = 0'),
    ((QUICK, '--config.eval_every_steps=0'), 'config.eval_every_steps = 0'),
    ((QUICK, '--config.accum_steps=0'), 'config.accum_steps = 0: must be an integer >= 1'),
    ((QUICK, '--config.accum_steps=-1'), 'config.accum_steps = -1'),
    ((QUICK, '--config.accum_steps=3'), 'accum_steps 3 does not divide the 16 examples per data-parallel device'),
    ((QUICK, '--config.num_classes=0'), 'config.num_classes = 0: must be an integer >= 1'),
    ((QUICK, '--config.num_classes=-3'), 'config.num_classes = -3'),
    ((QUICK, '--config.input.batch_size=0'), 'config.input.batch_size = 0'),
    ((QUICK, '--config.input.batch_size=-8'), 'config.input.batch_size = -8'),
    ((QUICK, '--config.input.batch_size=33'), 'batch_size 33 is not divisible by the 8 data-parallel devices'),
    (('--config=configs/quickstart.py:epochs=-1',), 'config.total_epochs = -1.0: must be a number > 0'),
    (('--config=configs/quickstart.py:steps=-3',), 'config.total_steps = -3: must be an integer > 0'),
    (('--config=configs/quickstart.py', '--config.total_epochs=0'), 'config.total_epochs = 0.0'),
    (('--config=configs/quickstart.py', '--config.total_steps=5', '--config.total_epochs=1'),
     'config.total: set exactly one of total_steps'),
    ((QUICK, '--config.schedule.warmup_steps=-1'), 'config.schedule.warmup_steps = -1: must be an integer >= 0'),
    (('--config=configs/quickstart.py:steps=2',), 'config.schedule: warmup (200 steps) must be shorter than the run'),
    ((QUICK, '--config.input.shuffle_buffer=0'), 'config.input.shuffle_buffer = 0'),
    ((QUICK, '--config.input.prefetch=-1'), 'config.input.prefetch = -1'),
    ((QUICK, '--config.profile.first_step=-1'), 'config.profile.first_step = -1'),
    ((QUICK, '--config.profile.num_steps=0'), 'config.profile.num_steps = 0'),
    ((QUICK, '--config.checkpoint.keep=0'), 'config.checkpoint.keep = 0: must be an integer >= 1 (the newest'),
    ((QUICK, '--config.checkpoint.keep=-1'), 'config.checkpoint.keep = -1'),
    ((QUICK, '--config.checkpoint.keep_every_steps=0'), 'config.checkpoint.keep_every_steps = 0'),
    # values that would train wrongly or fail deep inside JAX
    ((QUICK, '--config.lr=-0.1'), 'config.lr = -0.1: must be a number >= 0 (a negative learning rate climbs'),
    ((QUICK, '--config.lr=nan'), 'config.lr = nan'),
    ((QUICK, '--config.weight_decay=-1'), 'config.weight_decay = -1.0'),
    ((QUICK, '--config.label_smoothing=1.5'), 'config.label_smoothing = 1.5: must be a number in [0, 1)'),
    ((QUICK, '--config.mixup.prob=2'), 'config.mixup.prob = 2.0'),
    ((QUICK, '--config.mixup.mixup_alpha=-1'), 'config.mixup.mixup_alpha = -1.0'),
    ((QUICK, '--config.mixup.group_size=48'), 'config.mixup.group_size = 48: must be a divisor of input.batch_size'),
    ((QUICK, '--config.random_erasing.area_min=0.5'), 'config.random_erasing.area_min = 0.5: must be <= random'),
    ((QUICK, '--config.grad_clip_norm=0'), 'config.grad_clip_norm = 0.0: must be None or a number > 0'),
    ((QUICK, '--config.wd_mask=("[",)'), 'config.wd_mask'),
    # names that are not choices
    ((QUICK, '--config.model.dtype=float33'), "config.model.dtype = 'float33': must be one of ('float32'"),
    ((QUICK, '--config.model.dtype=int8'), "config.model.dtype = 'int8'"),
    ((QUICK, '--config.model.name=mixer_b61'),
     "config.model.name = 'mixer_b61': unknown model (did you mean mixer_b16"),
    ((QUICK, '--config.model.name=davit_tiny'), "davit_tiny has no option 'channels_mlp_dim'"),
    ((QUICK, '--config.loss=hinge'), "config.loss = 'hinge'"),
    ((QUICK, '--config.optimizer=lamb'), "config.optimizer = 'lamb'"),
    ((QUICK, '--config.schedule.type=step'), "config.schedule.type = 'step'"),
    ((QUICK, '--config.weight_decay_style=l2'), "config.weight_decay_style = 'l2'"),
    ((QUICK, '--config.input.cache=disk'), "config.input.cache = 'disk'"),
    ((QUICK, '--config.init_resize=nearest'), "config.init_resize = 'nearest'"),
    ((QUICK, '--config.init=/nonexistent.npz'), "config.init = '/nonexistent.npz'"),
    # meshes
    ((QUICK, '--config.mesh.shape=(3,1,1)'), 'mesh shape (3, 1, 1) needs 3 devices but 8 are available'),
    ((QUICK, '--config.mesh.shape=(0,1,1)'), 'config.mesh.shape = (0, 1, 1)'),
    ((QUICK, '--config.mesh.shape=(-1,-1,1)'), 'config.mesh.shape = (-1, -1, 1)'),
    ((QUICK, '--config.mesh.shape=(1,8)'), 'config.mesh.shape = (1, 8)'),
    # flags and the workdir
    ((QUICK, '--workdir={tmp}/file'), 'is a file: give a directory'),
    ((QUICK, '--workdir={tmp}/file/run'), 'cannot be created'),
    ((QUICK, '--workdir=s3://bucket/run'), 'only gs:// buckets are supported among URLs'),
    ((QUICK, '--workdirr=x'), "Unknown command line flag 'workdirr'"),
    ((QUICK, '--num_processes=0'), '--num_processes=0'),
]


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
  folder = tmp_path_factory.mktemp('bad_inputs')
  for name, source in BAD_RECIPES.items():
    (folder / name).write_text(source)
  (folder / 'file').write_text('not a folder')
  return folder


def one_line_error(fn) -> str:
  """The message `fn` exits with, asserted to be one line starting `error: ` (Python prints it to stderr and exits
  with status 1)."""
  with pytest.raises(SystemExit) as exit:
    fn()
  message = exit.value.code
  assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message, message
  return message


@pytest.mark.parametrize('args,fragment', TRAIN_CASES, ids=[' '.join(a[1:]) or a[0] for a, _ in TRAIN_CASES])
def test_train_py_bad_input_is_one_line(args, fragment, tmp, monkeypatch):
  monkeypatch.chdir(REPO)
  workdir = f'--workdir={tmp}/run'
  argv = ['train.py', *(a.format(tmp=tmp) for a in args)]
  if not any(a.startswith('--workdir') for a in argv):
    argv.append(workdir)
  assert fragment.format(tmp=tmp) in one_line_error(lambda: train.command(argv))


@pytest.mark.parametrize('evals,fragment', [
    ({'test': dict(split='test', pp='', type='bogus')}, "config.evals.test.type = 'bogus'"),
    ({'test': dict(split='test', pp='', batch_size=0)}, 'config.evals.test.batch_size = 0'),
    ({'test': dict(pp='')}, 'config.evals.test.split = None: must be a string'),
    ({'test': dict(splt='test', split='test', pp='')}, 'config.evals.test: unknown field(s) splt (did you mean split?)'),
    ({'train': dict(split='test', pp='')}, "config.evals.train: the name 'train' is reserved"),
])
def test_evaluations_are_checked(evals, fragment):
  config = quickstart.get_config()
  config.evals = evals
  with pytest.raises(ValueError, match=re.escape(fragment)):
    config_checks.check(config)


BENCH_CASES = [
    (('model', '--model', 'mixer_s32', '--batch', '0'), 'argument --batch: 0 must be >= 1'),
    (('model', '--model', 'mixer_s32', '--batch', '-4'), 'argument --batch: -4 must be >= 1'),
    (('model', '--model', 'mixer_s32', '--steps', '0'), 'argument --steps: 0 must be >= 1'),
    (('model', '--model', 'mixer_s32', '--repeats', '0'), 'argument --repeats: 0 must be >= 1'),
    (('model', '--model', 'mixer_s32', '--warmup', '-1'), 'argument --warmup: -1 must be >= 0'),
    (('model', '--model', 'mixer_s32', '--res', '0'), 'argument --res: 0 must be >= 1'),
    (('model', '--model', 'mixer_s32', '--batch', 'many'), "argument --batch: 'many' is not an integer"),
    (('model', '--model', 'mixer_s32', '--peak_tflops', '0'), 'argument --peak_tflops: 0 must be > 0'),
    (('model', '--model', 'mixer_s32', '--mesh', 'a,b'), "argument --mesh: 'a,b' is not three comma-separated"),
    (('model', '--model', 'mixer_s32', '--dtype', 'float33'), "argument --dtype: invalid choice: 'float33'"),
    (('model', '--model', 'mixer_x99'), "unknown model 'mixer_x99'"),
    (('model', '--model', 'mixer_s32', '--model_options', 'depth'), "'depth' is not key=value"),
    (('model', '--model', 'mixer_s32', '--model_options', 'depth=3'), "mixer_s32 has no option 'depth'"),
    (('model', '--model', 'mixer_s32', '--mode', 'fly'), "mode 'fly': choose 'train' or 'infer'"),
    (('model', '--model', 'mixer_s32', '--recipe', 'configs/nonexistent.py'), "no recipe file"),
    (('model', '--model', 'mixer_s32', '--jsonl', '{tmp}/missing/b.jsonl'), '--jsonl {tmp}/missing/b.jsonl: the '
     'folder'),
    (('model', '--model', 'mixer_s32', '--frobnicate'), 'unrecognized arguments: --frobnicate'),
    (('model',), 'the following arguments are required: --model'),
    (('fly',), "invalid choice: 'fly'"),
    (('input', '--batch_size', '0'), 'argument --batch_size: 0 must be >= 1'),
    (('input', '--num_images', '0'), 'argument --num_images: 0 must be >= 1'),
    (('compile', '--topology', 'v3:8x8'), 'give --config=configs/<recipe>.py'),
    (('compile', '--topology', 'v3:8x8', '--config=configs/mixer_i1k.py', '--config.lrr=1'),
     'did you mean --config.lr?'),
]


@pytest.mark.parametrize('args,fragment', BENCH_CASES, ids=[' '.join(a) for a, _ in BENCH_CASES])
def test_bench_bad_input_is_one_line(args, fragment, tmp, monkeypatch):
  monkeypatch.chdir(REPO)
  args = [a.format(tmp=tmp) for a in args]
  assert fragment.format(tmp=tmp) in one_line_error(lambda: bench.main(args))


def test_bench_recipe_may_be_a_file():
  by_name = bench.bench_config('mixer_s32', batch=8, recipe='mixer_i1k')
  by_path = bench.bench_config('mixer_s32', batch=8, recipe=os.path.join(REPO, 'configs', 'mixer_i1k.py'))
  assert by_name == by_path and by_name.model.name == 'mixer_s32'


def _command(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize('args', [
    ('train.py', QUICK, '--workdir={tmp}/never_made', '--config.lrr=0.1'),
    ('-m', 'mixer_jax.bench', 'model', '--model', 'mixer_s32', '--batch', '0'),
], ids=['train.py', 'bench'])
def test_a_real_process_prints_one_error_line_and_exits_1(args, tmp):
  run = _command(*(a.format(tmp=tmp) for a in args))
  assert run.returncode == 1, run.stderr
  assert [line for line in run.stderr.splitlines() if 'error' in line.lower()] == [run.stderr.strip()], run.stderr


@pytest.mark.slow
def test_traceback_flag_shows_the_stack(tmp):
  run = _command('train.py', QUICK, f'--workdir={tmp}/tb', '--config.lr=-1', '--traceback')
  assert run.returncode == 1 and 'Traceback' in run.stderr and 'config.lr = -1.0' in run.stderr, run.stderr
