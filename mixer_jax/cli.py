"""What the command-line tools (train.py, eval.py, python -m mixer_jax.convert / .bench) share: quiet library logs,
`key=value,...` option strings, user errors reported on one line, tcmalloc, multi-process start-up."""
import argparse
import ast
import difflib
import glob
import logging
import math
import os
import pathlib
import re
import sys
import tempfile
from typing import Callable, TypeVar

from absl import flags as absl_flags

from mixer_jax import paths

# Libraries that log every file they touch at INFO; their warnings still show.
_QUIET = ('/orbax/', '/tensorflow_datasets/', '/etils/', '/clu/', '/gcsfs/', '/fsspec/', '/jax/_src/xla_bridge.py')
# Where a library logs an error with its traceback and then raises it again to its caller (orbax's save threads,
# gcsfs's retries, clu's writer thread): the caller reports it in one line, so the log would only repeat it at length.
_RAISED_AGAIN = ('/orbax/checkpoint/_src/futures/future.py', '/orbax/checkpoint/checkpoint_manager.py',
                 '/orbax/checkpoint/_src/checkpointers/async_checkpointer.py', '/gcsfs/retry.py', '/clu/asynclib.py')
# What bad input raises: configs, shapes, files and folders (OSError: missing, unwritable, a file where a folder
# should be), a diverging run. Anything else is a bug and keeps its stack.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
T = TypeVar('T')
# The folder holding mixer_jax/ and configs/: the repository, or the installed distribution.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION_UNITS = ('steps', 'epochs', 'examples')  # configs/common.py
HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')


def quiet_library_logs(handler: logging.Handler) -> None:
  handler.addFilter(lambda r: r.levelno >= logging.WARNING or not any(p in r.pathname for p in _QUIET))
  handler.addFilter(lambda r: not (r.exc_info and r.pathname.endswith(_RAISED_AGAIN)))


def parse_options(text: str, what: str = 'options') -> dict:
  """'key=value,...' with Python literals where they parse (numbers, tuples, booleans, also as true/false),
  strings otherwise."""
  options = {}
  for pair in filter(None, text.split(',')):
    key, sep, value = pair.partition('=')
    if not sep:
      raise ValueError(f'{what}: {pair!r} is not key=value')
    if value.lower() in ('true', 'false'):  # the string 'false' would be truthy
      options[key] = value.lower() == 'true'
      continue
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  return options


def did_you_mean(word: str, choices, prefix: str = '') -> str:
  """' (did you mean <prefix>a or <prefix>b?)' naming the `choices` closest to a mistyped `word`; '' if none is."""
  close = difflib.get_close_matches(word, list(choices), n=3)
  return f' (did you mean {" or ".join(prefix + c for c in close)}?)' if close else ''


class RecipeHelp(Exception):
  """`--config=<recipe>:help`: the recipe's documentation and arguments, printed instead of running."""


def recipe_path(path: str) -> str:
  """`path` (`~` expanded); for a relative path that is not a file here, the project's own recipe of that name if
  there is one, so `--config=configs/quickstart.py` works from any directory."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or os.path.isfile(path):
    return path
  bundled = os.path.join(ROOT, path)
  return bundled if os.path.isfile(bundled) else path


def load_recipe(spec: str):
  """The ConfigDict of `--config=<path>[:arg]`: the recipe file's get_config(arg) (get_config() without a colon,
  as ml_collections calls it), with each way that can fail (no file, a syntax error, no get_config, get_config
  raising or returning something else) as one ValueError naming the recipe. A recipe whose `parse_arg` was asked
  for `help` (configs/common.py) raises RecipeHelp."""
  from ml_collections import ConfigDict
  path, colon, arg = spec.partition(':')
  path = recipe_path(path)
  if not os.path.isfile(path):
    recipes = ', '.join(os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
                        if 'def get_config' in pathlib.Path(p).read_text())
    raise ValueError(f'--config={spec}: no recipe file {path!r} (recipes: {recipes})')
  try:
    with open(path) as f:
      code = compile(f.read(), path, 'exec')
  except SyntaxError as error:
    raise ValueError(f'--config={spec}: {path} line {error.lineno}: {error.msg}: fix the recipe') from None
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f'--config={spec}: cannot read {path}: {error}') from None
  module = {'__name__': 'recipe', '__file__': path}
  try:
    exec(code, module)  # the user's own recipe, run as ml_collections runs it
    if not callable(module.get('get_config')):
      raise ValueError(f'{path} defines no get_config(arg) function')
    config = module['get_config'](arg) if colon else module['get_config']()
  except Exception as error:  # whatever the recipe raises is the recipe's message
    if hasattr(error, 'recipe_arguments'):
      shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
      raise RecipeHelp(_recipe_help(shown, module.get('__doc__'), error.recipe_arguments)) from None
    text = str(error).strip().replace('\n', ' ')
    if not isinstance(error, USER_ERRORS):
      text = f'{type(error).__name__}: {text}'
    raise ValueError(f'--config={spec}: {text}') from error
  if not isinstance(config, ConfigDict):
    raise ValueError(f'--config={spec}: get_config returned {type(config).__name__}, not an ml_collections ConfigDict')
  return config


def _recipe_help(path: str, doc: str | None, arguments: dict) -> str:
  listed = '\n'.join(f'  {key}={value!r}' for key, value in arguments.items())
  return (f'{(doc or path).strip()}\n\narguments of {path} (--config={path}:key=value,...), with their defaults:\n'
          f'{listed}\nAny config field can be set too: --config.<field>=value (--print_config lists them).')


def check_overrides(config, argv: list[str]) -> None:
  """Every `--config.<field>=value` of `argv` names a field of `config`; else a ValueError naming the closest."""
  for arg in argv:
    match = re.match(r'--(?:no)?config\.([^=]+)', arg)
    if not match:
      continue
    node, walked = config, []
    for part in match.group(1).split('.'):
      where = 'config' + ''.join(f'.{w}' for w in walked)
      if not hasattr(node, 'keys'):
        raise ValueError(f'--{match.group(0).lstrip("-")}: {where} is a value, not a group of fields: set it whole '
                         f'(--{where}=...)')
      if part not in node:
        hint = did_you_mean(part, list(node.keys()), prefix=f'--{where}.') or (
            f' ({where} has {", ".join(node.keys()) or "no fields"})')
        raise ValueError(f'--{match.group(0).lstrip("-")}: {where} has no field {part!r}{hint}')
      node = node[part]
      walked.append(part)


def wants_help(argv: list[str]) -> bool:
  return any(arg in HELP_FLAGS for arg in argv[1:])


def _print_usage(flag_values, argv: list[str]) -> None:
  """The command's docstring and flags: those of the module that defined them (train.py run as a script or as the
  installed `mixer-jax-train`) and the ones it adopted; --helpfull adds absl's."""
  commands = [m for m in flag_values.flags_by_module_dict() if not m.startswith(('absl', __name__))]
  if not commands:
    return
  command = sys.modules.get(commands[0]) or sys.modules['__main__']  # absl names a script's module by its path
  doc = command.__doc__ or ''
  print(f'{doc.strip()}\n\n{flag_values.get_help() if "--helpfull" in argv else flag_values.module_help(commands[0])}')


def parse_flags(flag_values, argv: list[str]) -> list[str]:
  """absl flag parsing of `argv` into `flag_values`, a malformed value or an unknown or missing flag on one line.
  --help prints the command's documentation and flags and exits 0 (absl's own exits 1)."""
  if wants_help(argv):
    _print_usage(flag_values, argv)
    sys.exit(0)
  try:
    return flag_values(argv)
  except absl_flags.Error as error:
    sys.exit(f'error: {str(error).strip().splitlines()[0]}')


def parse_config_flags(flag_values, argv: list[str]) -> list[str]:
  """`parse_flags` for commands with a `--config` recipe: the recipe is loaded and the overridden fields are looked
  up first (`load_recipe`, `check_overrides`), so what ml_collections and absl report is only a malformed value.
  `--config=<recipe>:help` prints the recipe's arguments and exits 0; --help prints them after the command's own.

  A relative recipe path that is not a file here names the project's own recipe (`recipe_path`): the `--config=`
  argument is rewritten in `argv` itself, the list ml_collections reads the `--config.<field>` overrides from.
  A duration overridden in another unit than the recipe's replaces it (`prefer_command_line_durations`)."""
  index = next((i for i in reversed(range(len(argv))) if argv[i].startswith('--config=')), None)
  if index is None:
    return parse_flags(flag_values, argv)
  path, colon, arg = argv[index][len('--config='):].partition(':')
  spec = f'{recipe_path(path)}{colon}{arg}'
  argv[index] = f'--config={spec}'
  if wants_help(argv):
    _print_usage(flag_values, argv)
    spec = spec.partition(':')[0] + ':help'
  try:
    check_overrides(load_recipe(spec), argv)
  except RecipeHelp as recipe_help:
    print(f'\n{recipe_help}' if wants_help(argv) else recipe_help)
    sys.exit(0)
  except ValueError as error:
    if '--traceback' in argv:
      raise
    sys.exit(f'error: {error}')
  if wants_help(argv):  # a recipe of the user's that takes no arguments
    sys.exit(0)
  rest = parse_flags(flag_values, argv)
  prefer_command_line_durations(flag_values.config, argv)
  return rest


def prefer_command_line_durations(config, argv: list[str]) -> None:
  """A duration set on the command line in one unit replaces the recipe's in another: `--config.total_steps=300`
  on a recipe of `total_epochs` makes a short run instead of a duration given twice (configs/common.py)."""
  given = {m.group(1) for m in (re.match(r'--config\.([\w.]+)=', a) for a in argv) if m}
  for field in given:
    *groups, last = field.split('.')
    name, _, unit = last.rpartition('_')
    node = config
    for group in groups:
      node = node.get(group) if hasattr(node, 'get') else None
    if unit not in DURATION_UNITS or not hasattr(node, 'keys') or last not in node:
      continue
    for other in DURATION_UNITS:
      replaced = '.'.join([*groups, f'{name}_{other}'])
      if other != unit and replaced not in given and node.get(f'{name}_{other}') is not None:
        node[f'{name}_{other}'] = None


def load_config(args: list[str]):
  """The ConfigDict of `--config=configs/<recipe>.py[:args]` with its `--config.field=value` overrides, read
  exactly as train.py reads them; `args` holds nothing else."""
  from ml_collections import config_flags
  flag_values = absl_flags.FlagValues()
  argv = ['mixer_jax'] + list(args)
  config_flags.DEFINE_config_file('config', None, 'configs/<recipe>.py[:key=value,...]', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  parse_config_flags(flag_values, argv)
  if flag_values.config is None:
    raise ValueError('give --config=configs/<recipe>.py[:key=value,...]')
  return flag_values.config


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """The description as written (a module docstring), and each option's default after its help."""

  def _get_help_string(self, action):
    text = action.help or ''
    if (action.option_strings and not action.required and action.default not in (None, False, argparse.SUPPRESS)
        and 'default' not in text):
      text += ' (default: %(default)s)'
    return text


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line, `error: <command>: <what>`, with exit status 1, as every other bad
  input (argparse's own prints the usage and exits 2); --help shows the description as written and the defaults."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', _HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    sys.exit(f'error: {self.prog}: {message} (--help lists the options)')


def at_least(low, kind=int, *, exclusive: bool = False):
  """An argparse type: a `kind` number >= `low` (> with `exclusive`): a batch of 0 or -1 steps is a usage error,
  not a crash."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}') from None
    if not (math.isfinite(value) and (value > low if exclusive else value >= low)):
      raise argparse.ArgumentTypeError(f'{text} must be {">" if exclusive else ">="} {low}')
    return value
  return parse


def check_output_file(path: str, what: str) -> None:
  """Raises now, before the work whose result goes to `path`, if it cannot be written there (tried with a
  temporary file: permission bits say nothing to root or on network file systems)."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f'{what} {path} is a directory: give a file name')
  parent = next((p for p in _ancestors(folder) if os.path.exists(p)), '/')
  if not os.path.isdir(parent):
    raise ValueError(f'{what} {path}: {parent} is a file, not a folder')
  if parent != folder:
    raise ValueError(f'{what} {path}: the folder {folder} does not exist: create it first')
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as error:
    raise ValueError(f'{what} {path}: cannot write in {folder} ({error.strerror})') from None


def _ancestors(path: str):
  """`path`, its parent, ... up to the root."""
  while True:
    yield path
    if os.path.dirname(path) == path:
      return
    path = os.path.dirname(path)


# What tells libtpu (installed by requirements-dev.txt, for TPU compiles) that this host has no TPU to look for.
_NO_TPU_HOST = (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_ACCELERATOR_TYPE', 'v3-8'))


def quiet_libtpu_probe() -> None:
  """Runs when the package is imported (mixer_jax/__init__.py), before JAX loads a backend. Where libtpu is
  installed but no TPU is attached (no /dev/accel*, /dev/vfio/<n>), JAX still loads libtpu, which asks the cloud
  metadata server about TPU hosts and prints a page of warnings before JAX falls back to the CPU or GPU; telling it
  there are none keeps the output of every command and of the Python API clean."""
  if not (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    for key, value in _NO_TPU_HOST:
      os.environ.setdefault(key, value)


def tpu_compiler_environment() -> None:
  """Call before JAX loads, to compile for TPUs with libtpu's compiler on a machine without one (the bench's
  `compile`, the tests): JAX runs on the CPU, libtpu is told there are no TPU hosts to probe, and, with no TPU to
  guard, several processes may load it at once (else all but the first fail on its lockfile)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if os.environ['JAX_PLATFORMS'] == 'cpu':
    for key, value in (*_NO_TPU_HOST, ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
      os.environ.setdefault(key, value)


def run(fn: Callable[[], T], *, traceback: bool = False) -> T:
  """fn(), with a user error turned into `error: <message>` on one line and exit status 1."""
  try:
    return fn()
  except USER_ERRORS as error:
    if traceback:
      raise
    if isinstance(error, paths.WorkdirWriteError):
      # Library threads retrying other writes to the failed storage would hold the exit for minutes (orbax's save
      # threads wait 300 s for each other, TensorFlow flushes TensorBoard's events again at exit): nothing they could
      # still write is needed to resume, so the process ends now.
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)
    sys.exit(f'error: {error}')


# -------------------------------------------------------------------------------------------------- allocator
# XLA:CPU allocates a step's temporaries as one block per call (2.2 GB for mixer_l16's training step at batch 4)
# and frees it when the call returns. glibc gives a block that large back to the kernel, so every step faults it
# in again page by page (mixer_l16: 550,000 page faults and 1-4 s of kernel time a step; davit_tiny: 21% of the
# step). tcmalloc keeps freed memory for the next call, as on Google's own hosts (Cloud TPU VMs preload it).
_TCMALLOC_GLOBS = tuple(f'{d}/libtcmalloc{v}.so.4' for d in ('/usr/lib/*-linux-gnu', '/usr/lib64', '/usr/lib',
                                                               '/usr/local/lib') for v in ('_minimal', ''))


def find_tcmalloc() -> str | None:
  """The installed tcmalloc (Debian: `apt-get install libtcmalloc-minimal4`), or None."""
  return next((path for pattern in _TCMALLOC_GLOBS for path in sorted(glob.glob(pattern))), None)


def preload_tcmalloc() -> None:
  """Restarts this command with tcmalloc preloaded (see above); call it first thing under `__main__`.

  Does nothing where tcmalloc is not installed, where LD_PRELOAD already names a malloc, or with
  MIXER_JAX_MALLOC=system.
  """
  preloaded = os.environ.get('LD_PRELOAD', '')
  if sys.platform != 'linux' or 'malloc' in preloaded or os.environ.get('MIXER_JAX_MALLOC') == 'system':
    return
  library = find_tcmalloc()
  if library:  # the restarted process sees 'malloc' in LD_PRELOAD, even if the loader could not load it
    os.environ['LD_PRELOAD'] = ':'.join(filter(None, (library, preloaded)))
    os.execv(sys.executable, sys.orig_argv)


# ----------------------------------------------------------------------------------------- multi-process jobs
def define_distributed_flags(flag_values) -> None:
  """The multi-process flags of train.py and eval.py, on their `absl.flags.FlagValues` (the command adopts them
as its key flags, so its --help lists them)."""
  define = dict(flag_values=flag_values)
  absl_flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process jobs started by '
                           'hand (auto-detected on Cloud TPU pods, SLURM and Open MPI).', **define)
  absl_flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).', lower_bound=1,
                            **define)
  absl_flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).', lower_bound=0,
                            **define)
  absl_flags.DEFINE_list('local_device_ids', None, 'Accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 for one '
                         'process per node under SLURM (whose detection otherwise gives each process one GPU).',
                         **define)
  absl_flags.DEFINE_integer('heartbeat_timeout', 100, 'Seconds after which a silent process counts as dead and the '
                            'job stops with an error instead of hanging.', lower_bound=1, **define)


def _detected_cluster() -> str | None:
  """A multi-process environment where jax.distributed.initialize() finds everything by itself."""
  env = os.environ
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'SLURM'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', ''):  # one host name per worker of a TPU pod slice
    return 'Cloud TPU pod'
  return None


def initialize_distributed(flags) -> None:
  """Starts jax.distributed when this is one of several processes (and logs how it found the others).

  Must run before anything touches a JAX device.
  """
  import jax
  explicit = flags.coordinator_address is not None
  cluster = None if explicit else _detected_cluster()
  if not explicit and cluster is None:
    return
  if explicit and (flags.num_processes is None or flags.process_id is None):
    raise ValueError('--coordinator_address needs --num_processes and --process_id')
  # CPU processes (tests, CPU clusters) exchange data through gloo; GPUs and TPUs use their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  local = [int(i) for i in flags.local_device_ids] if flags.local_device_ids else None
  jax.distributed.initialize(
      coordinator_address=flags.coordinator_address, num_processes=flags.num_processes,
      process_id=flags.process_id, local_device_ids=local, heartbeat_timeout_seconds=flags.heartbeat_timeout)
  logging.info('multi-process job from %s: process %d of %d', cluster or '--coordinator_address',
               jax.process_index(), jax.process_count())
