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


def define_flags(flag_values, argv: list[str]) -> None:
  """train.py's flags on `flag_values`; `argv` is the command line the config overrides are read from."""
  config_flags.DEFINE_config_file('config', None, 'configs/<recipe>.py[:key=value,...]', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard files.',
                      flag_values=flag_values)
  flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.', flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)
  cli.define_distributed_flags(flag_values)
  flags.adopt_module_key_flags(cli, flag_values=flag_values)


def run(argv: list[str], flag_values) -> dict:
  """Trains as `flag_values` say and returns the last metrics; a user error ends the process with one line
  (SystemExit)."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {" ".join(argv[1:])}: every option is a --flag=value (--help lists them)')
  cli.run(lambda: cli.initialize_distributed(flag_values), traceback=flag_values.traceback)
  from mixer_jax import trainer  # after flag parsing and jax.distributed: --help stays fast
  metrics = cli.run(lambda: trainer.train_and_evaluate(flag_values.config, flag_values.workdir),
                    traceback=flag_values.traceback)
  results = ', '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items()) if k.endswith(('/top1', '/loss'))
                      and not k.startswith('train/'))
  state = 'stopped (preempted) at' if metrics['preempted'] else 'finished at'
  print(f'{state} step {metrics["step"]}: {results or "no evaluations configured"}; workdir {flag_values.workdir}')
  return metrics


def command(argv: list[str]) -> dict:
  """`python train.py <argv[1:]>` in this process (tests): fresh flags, the same parsing and errors."""
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv)
  return run(cli.parse_config_flags(flag_values, argv), flag_values)


def main(argv: list[str]) -> None:  # absl's app.run exits with main's return value: this returns nothing
  cli.quiet_library_logs(logging.get_absl_handler())
  run(argv, flags.FLAGS)


if __name__ == '__main__':
  cli.quiet_libtpu_probe()
  cli.preload_tcmalloc()
  define_flags(flags.FLAGS, sys.argv)
  app.run(main, flags_parser=lambda argv: cli.parse_config_flags(flags.FLAGS, argv))
