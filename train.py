"""Train (or resume) a model from a config.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/quickstart.py --workdir=workdirs/short --config.total_steps=300  (a short run)
  python train.py --config=configs/finetune.py:model=mixer_b16,dataset=cifar10 --workdir=DIR --config.lr=0.01
  python train.py --config=configs/finetune.py:help           (the recipe's arguments and their defaults)
  python train.py --config=configs/quickstart.py --print_config   (the config it would run, without running)

Everything goes to --workdir: checkpoints (resumed automatically), metrics.jsonl, TensorBoard events and
config.json. A bad config or input fails with one line saying what is wrong (--traceback shows the stack).

Several processes (TPU pod hosts, SLURM tasks, or started by hand with --coordinator_address, --num_processes
and --process_id) run the same command; each reads its own slice of the data (see README, Scaling out).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixer_jax import cli  # light: it imports jax only when called


def define_flags(flag_values, argv: list[str]) -> None:
  """train.py's flags on `flag_values`; `argv` is the command line the config overrides are read from."""
  config_flags.DEFINE_config_file('config', None, 'configs/<recipe>.py[:key=value,...]', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard files.',
                      flag_values=flag_values)
  flags.DEFINE_bool('traceback', False, 'Show the full stack of an error instead of one line.', flag_values=flag_values)
  flags.DEFINE_bool('print_config', False, 'Print the config (the recipe with its arguments and the --config.<field> '
                    'overrides) and exit without training.', flag_values=flag_values)
  flags.DEFINE_bool('parameter_table', False, 'Log a table of every parameter (name, shape, dtype, size) at the '
                    'start; by default one line counts them.', flag_values=flag_values)
  flags.mark_flag_as_required('config', flag_values=flag_values)
  cli.define_distributed_flags(flag_values)
  flags.adopt_module_key_flags(cli, flag_values=flag_values)


def run(argv: list[str], flag_values) -> dict:
  """Trains as `flag_values` say and returns the last metrics; a user error ends the process with one line
  (SystemExit)."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {" ".join(argv[1:])}: every option is a --flag=value (--help lists them)')
  if flag_values.print_config:
    print(flag_values.config, end='')
    return {}
  if not flag_values.workdir:
    sys.exit('error: --workdir is required: give the directory the run writes to (and resumes from)')
  cli.run(lambda: cli.initialize_distributed(flag_values), traceback=flag_values.traceback)
  from mixer_jax import trainer  # after flag parsing and jax.distributed: --help stays fast
  metrics = cli.run(lambda: trainer.train_and_evaluate(flag_values.config, flag_values.workdir,
                                                       parameter_table=flag_values.parameter_table),
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


def script() -> None:
  """`python train.py` (and the `mixer-jax-train` command pyproject.toml installs)."""
  cli.preload_tcmalloc()
  define_flags(flags.FLAGS, sys.argv)
  app.run(main, flags_parser=lambda argv: cli.parse_config_flags(flags.FLAGS, argv))


if __name__ == '__main__':
  script()
