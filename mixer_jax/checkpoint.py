"""Checkpoints of the train state (orbax): async saves, keep/prune, checksums, fallback past damaged checkpoints,
preemption, restore onto any mesh.

A checkpoint is the whole train state (params, optimizer state, batch_stats, step, rng) in
`<workdir>/checkpoints/<step>`: the arrays under `default/` (orbax's StandardSave: `_METADATA` holds the tree,
shapes and dtypes; `ocdbt.process_<i>/d/` the data, with chunks of up to 1 KiB inline in the index nodes that
`d/` holds) and, in the step's `_CHECKPOINT_METADATA`, a checksum of every array (`custom_metadata
['state_checksums']`: leaf path -> [sum, index-weighted sum] of the array's bits as uint32 words, mod 2**32). Both
are written inside orbax's temporary directory, which is renamed when the save is complete (in a bucket, where a
folder cannot be renamed, orbax writes the step in place and its `commit_success.txt` last), so `latest_step()` only
ever sees complete checkpoints with their checksums, and an interrupted save is ignored on resume. The checksum is
one jitted pass over the state where it lies, at save steps only; integer sums are exact in any order, so it does
not depend on the mesh: a checkpoint written on 8 devices verifies on 1.

Restoring reads the checkpoint's own tree metadata first and compares it with the target: another tree, shape or
dtype is a config error (one line, nothing moved). Then the arrays are restored onto an abstract target carrying
the *current* mesh's shardings (a checkpoint written by a pod restores on 8 GPUs or 1 CPU) and their checksums are
compared with the saved ones. `restore_newest` falls back past damage: a checkpoint that fails (unreadable
metadata, missing, short or corrupt array files, a checksum mismatch) is logged in one warning line and moved to
`<workdir>/checkpoints_damaged/<step>`, and the next older one is tried. Checkpoints written before checksums
existed restore with a warning. With several processes every process takes the same decision (each attempt's
success is all-gathered), and process 0 alone moves directories.

The data position needs no saving: the input stream is a pure function of (seed, step).

Must not: decide when to save (the trainer does), know what is inside the state (any pytree of arrays on one set of
devices), or delete a checkpoint beyond orbax's keep policy (damaged ones are moved aside, never deleted).
"""
import contextlib
import itertools
import signal
import sys
import threading

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry

from mixer_jax import paths

CHECKSUMS = 'state_checksums'  # the key in the step's custom metadata
_SHOWN = 4  # differing leaves named in a message
COMMIT_MARKER = 'commit_success.txt'  # in a bucket, orbax takes a step folder for a checkpoint once this is in it


class _Damaged(Exception):
  """A checkpoint that cannot be restored as written; the message says why."""


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, keep_every_steps: int | None = None, async_save: bool = True):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep} would delete the newest checkpoint too: set keep >= 1 (the newest '
                       'complete checkpoint is never deleted; keep every checkpoint with checkpoint.keep_every_steps '
                       'or a large keep)')
    if keep_every_steps is not None and keep_every_steps < 1:
      raise ValueError(f'checkpoint.keep_every_steps={keep_every_steps}: set None (keep only the last '
                       'checkpoint.keep) or >= 1 (also keep every checkpoint at a multiple of it)')
    paths.configure_clients()
    _bound_bucket_retries(paths.bucket_retries())
    _ignore_io_into_closed_loops()
    _no_replica_parallel_saves_in_one_cpu_process()
    self.workdir = paths.resolve(workdir)
    self.directory = paths.join(self.workdir, 'checkpoints')
    self.damaged_directory = paths.join(self.workdir, 'checkpoints_damaged')
    # The handler registered up front lets metadata(step) read a checkpoint's tree before anything is restored.
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every_steps,
                                             enable_async_checkpointing=async_save, create=True))
    self._writing = None  # the step of the last save not yet known to be complete

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts writing `state` and its checksums as checkpoint `step` (in the background when async) unless it
    exists, once the previous save is complete. Blocks for the checksum pass and orbax's copy of the state to host
    memory. A save that fails (here or in the background) raises paths.WorkdirWriteError, here or in `wait`."""
    self.wait()
    if step in self._manager.all_steps():
      return
    self._writing = step
    with self._failures_named():
      self._manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={CHECKSUMS: checksums(state)},
                         force=True)

  def restore(self, abstract_state, step: int | None = None):
    """The checkpoint `step` (default: the newest) laid out as `abstract_state` (ShapeDtypeStructs with
    shardings, see `abstract_like`), whatever mesh wrote it, verified against its checksums."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    try:
      return self._restore_verified(step, abstract_state)
    except _Damaged as damage:
      raise ValueError(f'checkpoint {step} in {self.directory} is damaged ({damage}): restore another step '
                       f'(saved: {", ".join(map(str, self._manager.all_steps()))}), or resume with restore_newest, '
                       'which falls back past damaged checkpoints') from None

  def restore_newest(self, abstract_state):
    """The newest checkpoint that restores intact, laid out as `abstract_state`; None when there is none at all.

    A damaged one is logged, moved to `damaged_directory` and the next older one tried; a ValueError names every
    tried checkpoint when none restores, or the first one whose tree differs from `abstract_state`.
    """
    tried = []
    while (step := self.latest_step()) is not None:
      try:
        return self._restore_verified(step, abstract_state)
      except _Damaged as damage:
        moved = self._move_aside(step)
        logging.warning('checkpoint %d in %s is damaged (%s): moved it to %s; trying the next older one', step,
                        self.directory, damage, moved)
        tried.append(f'{step} ({damage}; moved to {moved})')
    if tried:
      raise ValueError(f'no checkpoint in {self.directory} restores: {"; ".join(tried)}: move a repaired one back '
                       f'to resume from it, or run again to start from step 0')
    return None

  def _restore_verified(self, step: int, abstract_state):
    """Checkpoint `step` after checking its tree against `abstract_state` and its arrays against its checksums;
    _Damaged when it cannot be read or does not match its checksums."""
    saved_leaves, expected = _agreed(lambda: self._saved_metadata(step), 'its metadata is unreadable')
    differences = _differences(saved_leaves, _leaves(abstract_state))
    if differences:
      raise ValueError(
          f'checkpoint {step} in {self.directory} holds a different train state than this config builds (it differs '
          f'at {_first_few(differences)}): resume with the model and optimizer that wrote it, or start a new --workdir '
          '(config.init=<checkpoint> fine-tunes from it)')
    state = _agreed(lambda: self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state)),
                    'its arrays do not read back')
    if expected is None:
      logging.warning('checkpoint %d in %s has no checksums (written before checkpoints carried them): restored '
                      'without verifying its arrays', step, self.directory)
      return state
    actual = checksums(state)
    bad = [name for name, sums in actual.items() if expected.get(name) != sums]
    if bad:
      raise _Damaged(f'{len(bad)} of {len(actual)} arrays differ from the checksums saved with them: '
                     f'{_first_few(bad)}')
    return state

  def _saved_metadata(self, step: int) -> tuple[dict, dict | None]:
    """(leaf path -> (shape, dtype), checksums or None) as checkpoint `step` records them."""
    metadata = self._manager.metadata(step)
    if metadata.item_metadata is None:
      raise _Damaged('orbax finds no tree metadata in it (default/_METADATA)')
    # orbax stamps the commit time into the step metadata of every checkpoint it completes: without it, the file
    # was unreadable (orbax logs why and goes on with empty metadata) and the checksums with it.
    if metadata.commit_timestamp_nsecs is None:
      raise _Damaged('its step metadata (_CHECKPOINT_METADATA) is missing or unreadable')
    return _leaves(metadata.item_metadata.tree), (metadata.custom_metadata or {}).get(CHECKSUMS)

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` into `damaged_directory` (under a fresh name) and forgets it; returns where."""
    target = _unused_path(paths.join(self.damaged_directory, str(step)))
    _barrier('mixer_jax.checkpoint: damaged target chosen')  # before process 0 takes the name
    if jax.process_index() == 0:
      paths.move(paths.join(self.directory, str(step)), target, marker=COMMIT_MARKER)
    _barrier('mixer_jax.checkpoint: damaged moved')
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until the save in flight is complete; paths.WorkdirWriteError when it failed."""
    with self._failures_named():
      self._manager.wait_until_finished()
    self._writing = None

  def write_failed(self, what: str, error: Exception) -> paths.WorkdirWriteError:
    """`error`, a failed write of `what` to the workdir (by any library), as one line naming the step a restart
    resumes from. Waits for the save in flight first: a storage that failed one write fails that save too, and only
    its outcome tells which checkpoint is the newest complete one."""
    try:
      self.wait()
    except paths.WorkdirWriteError as failed_save:
      return failed_save
    return self._failure(what, error, failed_step=None)

  @contextlib.contextmanager
  def _failures_named(self):
    """A save's failure (a storage error, raised by whichever library was writing) as `write_failed`'s one line."""
    try:
      yield
    except (MemoryError, jax.errors.JaxRuntimeError):
      raise
    except Exception as error:
      step, self._writing = self._writing, None
      raise self._failure(f'checkpoint {step}', error, failed_step=step) from error

  def _failure(self, what: str, error: Exception, failed_step: int | None) -> paths.WorkdirWriteError:
    complete = [s for s in self._manager.all_steps() if s != failed_step]
    resume = f'step {max(complete)}' if complete else 'the start (no checkpoint is complete)'
    return paths.WorkdirWriteError(f'{what} could not be written to {self.workdir} ({_first_line(error)}): once it '
                                   f'is writable again, run the same command to resume from {resume}')

  def close(self) -> None:
    self._manager.close()


def _bound_bucket_retries(retries: int) -> None:
  """Bounds how long a save keeps retrying a bucket request that fails: tensorstore's default policy (32 retries,
  backing off to 32 s) goes on for about 15 minutes against an endpoint that stopped answering, while the run keeps
  training on a checkpoint that will never commit. orbax builds every TensorStore context from these two templates
  (orbax.checkpoint's tensorstore_utils.get_ts_context, which takes no context of ours), so the policy goes into
  them, for the whole process."""
  policy = {'max_retries': retries, 'initial_delay': '1s', 'max_delay': '32s'}
  for template in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    template['gcs_request_retries'] = policy


def _no_replica_parallel_saves_in_one_cpu_process() -> None:
  """orbax's replica-parallel saving has each replica of an array write a slice of it, to spread the copies to host
  memory and the writes over devices and hosts. One process on the CPU has neither to spread, and the slicing
  compiles a program per slice and device: 280 for the DaViT quickstart on 8 devices, 15 s of its first save. (orbax
  turns it off on GPUs itself.) For the whole process, as orbax's type handlers are."""
  if jax.process_count() == 1 and jax.default_backend() == 'cpu':
    type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(  # the public register_type_handler logs a warning
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True, ignore_warnings=True)


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with the given shardings: the restore target for the current mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


# -------------------------------------------------------------------------------------------------- checksums
def checksums(state) -> dict[str, list[int]]:
  """Leaf path -> [sum, index-weighted sum] of the leaf's bits as uint32 words, mod 2**32: one jitted pass over the
  state where it lies (the same value for any sharding), fetched to the host."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = np.asarray(_leaf_checksums([x for _, x in flat]))  # replicated: every process can read it
  return {_path_name(_tokens(path)): [int(a), int(b)] for (path, _), (a, b) in zip(flat, sums)}


@jax.jit
def _leaf_checksums(leaves):
  return jnp.stack([_fletcher(x) for x in leaves])


def _fletcher(x):
  """[sum of words, sum of words * (flat index + 1)] in uint32, which wraps: exact mod 2**32 in any order. The
  weights catch words that moved; the index is built from per-axis iotas, so a sharded array is never reshaped."""
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (index + 1), dtype=jnp.uint32)])


def _words(x):
  """x's bits as uint32: a word per element for 32-bit types, narrower ones widened, wider ones split (last axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits < 32:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}')).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


# ------------------------------------------------------------------------------------------------ tree checks
def _tokens(path) -> tuple:
  """A key path as plain names (str) and positions (int): orbax's metadata turns dataclasses and namedtuples into
  dicts, so attribute and dict keys must compare equal."""
  return tuple(k.idx if isinstance(k, jax.tree_util.SequenceKey) else
               k.key if isinstance(k, jax.tree_util.FlattenedIndexKey) else
               str(k.name if isinstance(k, jax.tree_util.GetAttrKey) else k.key) for k in path)


def _path_name(tokens: tuple) -> str:
  return ''.join(f'[{t}]' if isinstance(t, int) else f'.{t}' for t in tokens).lstrip('.')


def _leaves(tree) -> dict[tuple, tuple]:
  """Leaf path tokens -> (shape, dtype) of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
  return {_tokens(path): (tuple(x.shape), np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differences(saved: dict, wanted: dict) -> list[str]:
  """Where two trees of leaves differ: the first node of a branch that only one has, and leaves whose shape or
  dtype differ."""
  out = []
  for ours, theirs, where in ((saved, wanted, 'only in the checkpoint'), (wanted, saved, 'only in this config')):
    prefixes = {path[:i] for path in theirs for i in range(len(path) + 1)}
    for path in ours.keys() - theirs.keys():
      node = next((path[:i] for i in range(1, len(path) + 1) if path[:i] not in prefixes), path)
      out.append(f'{_path_name(node)} ({where})')
  for path in saved.keys() & wanted.keys():
    if saved[path] != wanted[path]:
      (shape, dtype), (want_shape, want_dtype) = saved[path], wanted[path]
      out.append(f'{_path_name(path)} (checkpoint {shape} {dtype}, this config {want_shape} {want_dtype})')
  return sorted(set(out))


def _first_few(names: list[str]) -> str:
  return ', '.join(names[:_SHOWN]) + (' ...' if len(names) > _SHOWN else '')


# ---------------------------------------------------------------------------------------------- multi-process
def _agreed(attempt, what: str):
  """attempt() on every process; _Damaged on all of them when it failed on any (all must restore the same step).
  Runtime errors (out of memory) are not damage and propagate."""
  try:
    result, reason = attempt(), None
  except _Damaged as damage:
    result, reason = None, str(damage)
  except (MemoryError, jax.errors.JaxRuntimeError):
    raise
  except Exception as error:  # orbax and tensorstore raise anything from JSONDecodeError to bare Exception
    result, reason = None, f'{what}: {_first_line(error)}'
  failed = np.flatnonzero(_allgather(reason is not None))
  if failed.size:
    raise _Damaged(reason or f'it failed on process(es) {", ".join(map(str, failed))}')
  return result


def _first_line(error: BaseException) -> str:
  """The innermost cause's type and first line (tensorstore puts the file and the problem there), without the
  tensorstore spec that follows them (a page of JSON)."""
  while error.__cause__ is not None:
    error = error.__cause__
  line = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
  return f'{type(error).__name__}: {line}'


def _ignore_io_into_closed_loops() -> None:
  """A failed orbax read or write ends its asyncio loop while tensorstore still completes the other requests it
  started; each completion then raises 'Event loop is closed' in a tensorstore thread, and Python would print a
  traceback for every one of them (dozens, about nothing: the failure is reported once). Installed before the first
  request, as some complete before the failure reaches us."""
  hook = sys.unraisablehook
  if getattr(hook, 'ignores_closed_loops', False):
    return

  def ignoring(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      hook(unraisable)
  ignoring.ignores_closed_loops = True
  sys.unraisablehook = ignoring


def _allgather(flag: bool) -> np.ndarray:
  if jax.process_count() == 1:
    return np.array([flag])
  return np.asarray(multihost_utils.process_allgather(np.array(flag)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _unused_path(path: str) -> str:
  return next(p for p in itertools.chain([path], (f'{path}.{i}' for i in itertools.count(1)))
              if not paths.at(p).exists())


class Preemption:
  """`preemption(step)` is True once the job was told to stop (SIGTERM) and should save at this step.

  With several processes, JAX's preemption service (started by jax.distributed.initialize) catches the
  signal and makes every process agree on the same step; a single process just watches for SIGTERM.
  """

  def __init__(self):
    self._signalled = threading.Event()
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())

  def __call__(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled.is_set()
    return ocp.multihost.reached_preemption(step)
