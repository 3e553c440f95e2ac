"""What the command-line tools (train.py, eval.py, python -m mixer_jax.convert / .bench) share: quiet library logs,
`key=value,...` option strings, user errors reported on one line, tcmalloc, multi-process start-up."""
import ast
import glob
import logging
import os
import sys
from typing import Callable, TypeVar

from absl import flags as absl_flags

# Libraries that log every file they touch at INFO; their warnings still show.
_QUIET = ('/orbax/', '/tensorflow_datasets/', '/etils/', '/clu/', '/jax/_src/xla_bridge.py')
# What bad input raises: configs, files, shapes, a diverging run. Anything else is a bug and keeps its stack.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
T = TypeVar('T')


def quiet_library_logs(handler: logging.Handler) -> None:
  handler.addFilter(lambda r: r.levelno >= logging.WARNING or not any(p in r.pathname for p in _QUIET))


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


def parse_config_flags(flag_values, argv: list[str]) -> list[str]:
  """absl flag parsing of `argv` into `flag_values` (which define a `config` file flag), with config mistakes
  (a missing recipe, its get_config failing, a malformed value, a field the config lacks) on one line."""
  try:
    remaining = flag_values(argv)
    flag_values.config.keys()  # ml_collections defers a failure to load the file until first use
    return remaining
  except IOError as error:  # a missing recipe file, or its get_config failing (e.g. a missing image folder)
    given = next((arg.partition('=')[2] for arg in reversed(argv) if arg.startswith('--config=')), 'the --config')
    reason = str(error).splitlines()[-1].strip().removeprefix(
        'Configuration is not available because of an earlier failure to load: ')
    sys.exit(f'error: cannot load {given}: {reason}')
  except absl_flags.Error as error:  # a malformed value, or an error raised by the recipe's get_config
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    sys.exit(f'error: {lines[-1] if "Traceback" in str(error) else lines[0]}')
  except (AttributeError, KeyError) as error:  # an override of a field the config does not have
    missing = str(error).strip('"\'')
    for arg in argv:
      path = arg.partition('=')[0].removeprefix('--config.')
      if arg.startswith('--config.') and path.split('.')[-1] == missing:
        sys.exit(f'error: --config.{path}: the config has no field {path!r} (see the recipe file for its fields)')
    raise


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


def tpu_compiler_environment() -> None:
  """Call before JAX loads, to compile for TPUs with libtpu's compiler on a machine without one (the bench's
  `compile`, the tests): JAX runs on the CPU; libtpu still probes for local TPU hosts when it loads, and these
  values tell it there are none to find (else it prints a page of warnings); with no TPU to guard, several
  processes may load it at once (else all but the first fail on its lockfile)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if os.environ['JAX_PLATFORMS'] == 'cpu':
    for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
                       ('TPU_ACCELERATOR_TYPE', 'v3-8'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
      os.environ.setdefault(key, value)


def run(fn: Callable[[], T], *, traceback: bool = False) -> T:
  """fn(), with a user error turned into `error: <message>` on one line and exit status 1."""
  try:
    return fn()
  except USER_ERRORS as error:
    if traceback:
      raise
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
def define_distributed_flags(flags) -> None:
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process jobs started by hand '
                      '(auto-detected on Cloud TPU pods, SLURM and Open MPI).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).')
  flags.DEFINE_list('local_device_ids', None, 'Accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 for one '
                    'process per node under SLURM (whose detection otherwise gives each process one GPU).')
  flags.DEFINE_integer('heartbeat_timeout', 100, 'Seconds after which a silent process counts as dead and the '
                       'job stops with an error instead of hanging.')


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
