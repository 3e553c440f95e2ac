"""Train (or resume) a model from a config.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/finetune.py:model=mixer_b16,dataset=cifar10 --workdir=DIR --config.lr=0.01

Everything goes to --workdir: checkpoints (resumed automatically), metrics.jsonl, TensorBoard events and
config.json. A bad config or input fails with one line saying what is wrong (--traceback shows the stack).

Several processes (TPU pod hosts, SLURM tasks, or started by hand with --coordinator_address, --num_processes
and --process_id) run the same command; each reads its own slice of the data (see README, Scaling out).
"""
import os

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
  app.run(main, flags_parser=lambda argv: cli.parse_config_flags(FLAGS, argv))
