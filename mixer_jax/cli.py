"""What the command-line tools (train.py, eval.py, python -m mixer_jax.convert) share: quiet library logs,
`key=value,...` option strings, and user errors reported on one line."""
import ast
import logging
import sys
from typing import Callable, TypeVar

# Libraries that log every file they touch at INFO; their warnings still show.
_QUIET = ('/orbax/', '/tensorflow_datasets/', '/etils/', '/clu/', '/jax/_src/xla_bridge.py')
# What bad input raises: configs, files, shapes, a diverging run. Anything else is a bug and keeps its stack.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
T = TypeVar('T')


def quiet_library_logs(handler: logging.Handler) -> None:
  handler.addFilter(lambda r: r.levelno >= logging.WARNING or not any(p in r.pathname for p in _QUIET))


def parse_options(text: str, what: str = 'options') -> dict:
  """'key=value,...' with Python literals where they parse (numbers, tuples, booleans), strings otherwise."""
  options = {}
  for pair in filter(None, text.split(',')):
    key, sep, value = pair.partition('=')
    if not sep:
      raise ValueError(f'{what}: {pair!r} is not key=value')
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  return options


def run(fn: Callable[[], T], *, traceback: bool = False) -> T:
  """fn(), with a user error turned into `error: <message>` on one line and exit status 1."""
  try:
    return fn()
  except USER_ERRORS as error:
    if traceback:
      raise
    sys.exit(f'error: {error}')
