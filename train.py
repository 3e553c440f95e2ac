"""Train (or resume) a model from a config.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/finetune.py:model=mixer_b16,dataset=cifar10 --workdir=DIR --config.lr=0.01

Everything goes to --workdir: checkpoints (resumed automatically), metrics.jsonl, TensorBoard events and
config.json. A bad config or input fails with one line saying what is wrong (--traceback shows the stack).

Several processes (TPU pod hosts, SLURM tasks, or started by hand with --coordinator_address, --num_processes
and --process_id) run the same command; each reads its own slice of the data (see README, Scaling out).
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ start-up chatter

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mixer_jax import cli  # noqa: E402  (light: it imports jax only when called)

config_flags.DEFINE_config_file('config', None, 'configs/<recipe>.py[:key=value,...]', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard files.')
flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS
cli.define_distributed_flags(flags)
flags.adopt_module_key_flags(cli)

def parse_flags(argv):
  """absl flag parsing, with config mistakes reported on one line instead of a stack."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # ml_collections defers a failure to load the file until first use
    return remaining
  except IOError as error:  # a missing recipe file, or its get_config failing (e.g. a missing image folder)
    given = next((arg.partition('=')[2] for arg in reversed(argv) if arg.startswith('--config=')), 'the --config')
    reason = str(error).splitlines()[-1].strip().removeprefix(
        'Configuration is not available because of an earlier failure to load: ')
    sys.exit(f'error: cannot load {given}: {reason}')
  except flags.Error as error:  # a malformed value, or an error raised by the recipe's get_config
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    sys.exit(f'error: {lines[-1] if "Traceback" in str(error) else lines[0]}')
  except (AttributeError, KeyError) as error:  # an override of a field the config does not have
    missing = str(error).strip('"\'')
    for arg in argv:
      path = arg.partition('=')[0].removeprefix('--config.')
      if arg.startswith('--config.') and path.split('.')[-1] == missing:
        sys.exit(f'error: --config.{path}: the config has no field {path!r} (see the recipe file for its fields)')
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_library_logs(logging.get_absl_handler())
  cli.run(lambda: cli.initialize_distributed(FLAGS), traceback=FLAGS.traceback)
  from mixer_jax import trainer  # after flag parsing and jax.distributed: --help stays fast
  metrics = cli.run(lambda: trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir), traceback=FLAGS.traceback)
  results = ', '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items()) if k.endswith(('/top1', '/loss'))
                      and not k.startswith('train/'))
  state = 'stopped (preempted) at' if metrics['preempted'] else 'finished at'
  print(f'{state} step {metrics["step"]}: {results or "no evaluations configured"}; workdir {FLAGS.workdir}')


if __name__ == '__main__':
  cli.preload_tcmalloc()
  app.run(main, flags_parser=parse_flags)
