"""Checkpoints of the train state (orbax): async saves, keep/prune, preemption, restore onto any mesh.

A checkpoint is the whole train state (params, optimizer state, batch_stats, step, rng) in
`<workdir>/checkpoints/<step>`. orbax writes each save to a temporary directory and renames it when complete,
so `latest_step()` only ever sees complete checkpoints and an interrupted save is ignored on resume.
Restoring always goes through an abstract target carrying the *current* mesh's shardings, so a checkpoint
written by a pod restores on 8 GPUs or 1 CPU. The data position needs no saving: the input stream is a
pure function of (seed, step).

Must not: decide when to save (the trainer does) or know what is inside the state.
"""
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, keep_every_steps: int | None = None, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every_steps, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts writing `state` as checkpoint `step` (in the background when async) unless it exists."""
    if step not in self._manager.all_steps():
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """The checkpoint `step` (default: the newest) laid out as `abstract_state` (ShapeDtypeStructs with
    shardings, see `abstract_like`), whatever mesh wrote it."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except ValueError as e:
      if 'structures do not match' not in str(e):
        raise
      paths = [line.strip().rstrip(':') for line in str(e).splitlines()
               if line.endswith(':') and not line.startswith((' ', 'User'))]
      raise ValueError(
          f'checkpoint {step} in {self.directory} holds a different train state than this config builds (it differs '
          f'at {", ".join(paths[:3])}{" ..." if len(paths) > 3 else ""}): resume with the model and optimizer that '
          'wrote it, or start a new --workdir (config.init=<checkpoint> fine-tunes from it)') from None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs with the given shardings: the restore target for the current mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


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
