"""Damaged, old and foreign checkpoints: checksums catch what orbax restores silently, `restore_newest` falls back to
the newest intact checkpoint and moves damaged ones aside, a different tree is a config error that moves nothing;
and the checkpoint benchmark. A small state of float32, bfloat16, int32 and uint32 arrays with an Adam state,
sharded over the 8 simulated devices, stands in for a train state."""
import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixer_jax import bench, checkpoint

TINY_MIXER = 'hidden_dim=32,num_blocks=1,tokens_mlp_dim=16,channels_mlp_dim=64,image_size=64'


def _mesh(devices: int = 8) -> Mesh:
  return Mesh(np.array(jax.devices()[:devices]), ('x',))


def _incompressible(rng, shape) -> np.ndarray:
  """float32 of uniformly random bits (finite ones): zstd stores them as they are, so a test can find and damage
  them in the data files, and the damage changes the array instead of breaking the decompression."""
  bits = rng.integers(0, 2**32, shape, dtype=np.uint32)
  exponent = (bits >> 23) & 0xFF
  bits = np.where((exponent == 0) | (exponent == 0xFF), bits ^ (np.uint32(0x40) << 23), bits)  # no inf/nan/subnormal
  return bits.view(np.float32)


def _host_state(seed: int, optimizer=optax.adam(1e-3), kernel_rows: int = 256):
  rng = np.random.default_rng(seed)
  params = {'dense': {'kernel': _incompressible(rng, (kernel_rows, 64))},
            'norm': {'scale': rng.standard_normal(64, np.float32).astype(jnp.bfloat16)}}
  return {'step': np.int32(seed), 'params': params, 'opt_state': optimizer.init(params),
          'rng': rng.integers(0, 2**32, 2, dtype=np.uint32)}


def _shardings(state, mesh):
  """Matrices split over the mesh by rows, the rest replicated on it."""
  return jax.tree.map(lambda x: NamedSharding(mesh, P('x') if np.ndim(x) == 2 else P()), state)


def _abstract(state, mesh):
  return checkpoint.abstract_like(state, _shardings(state, mesh))


def _save(tmp_path, steps=(2, 4)) -> dict:
  """Saves a different state at each step from 8 devices; returns them as host arrays."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  saved = {}
  for step in steps:
    state = _host_state(step)
    ckpt.save(step, jax.device_put(state, _shardings(state, _mesh())))
    saved[step] = state
  ckpt.wait()
  ckpt.close()
  return saved


def _assert_identical(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    a = jax.device_get(a)
    assert a.dtype == np.asarray(b).dtype and np.array_equal(a, b)


def _data_file(step_dir: str) -> str:
  """The largest array data file: it holds the random kernel, whose bytes zstd leaves as they are."""
  return max(glob.glob(os.path.join(step_dir, 'default', 'ocdbt.process_*', 'd', '*')), key=os.path.getsize)


def _flip_bytes(step_dir: str) -> None:
  """Inverts 8 bytes inside the step-4 kernel's data, found by its bytes (zstd stores random floats as they are):
  OCDBT packs several arrays' chunks into one file, so a fixed offset may land in another array's."""
  needle = _host_state(4)['params']['dense']['kernel'][100].tobytes()[:16]
  for path in glob.glob(os.path.join(step_dir, 'default', 'ocdbt.process_*', 'd', '*')):
    with open(path, 'r+b') as f:
      at = f.read().find(needle)
      if at >= 0:
        f.seek(at)
        f.write(bytes(b ^ 0x5A for b in needle[:8]))
        return
  raise AssertionError(f'the kernel\'s bytes are in no data file of {step_dir}')


DAMAGE = {
    'truncated data file': lambda d: os.truncate(_data_file(d), os.path.getsize(_data_file(d)) // 2),
    'deleted data file': lambda d: os.remove(_data_file(d)),
    'flipped bytes': _flip_bytes,
    'empty _METADATA': lambda d: open(os.path.join(d, 'default', '_METADATA'), 'w').close(),
    'deleted _METADATA': lambda d: os.remove(os.path.join(d, 'default', '_METADATA')),
    'empty _CHECKPOINT_METADATA': lambda d: open(os.path.join(d, '_CHECKPOINT_METADATA'), 'w').close(),
}


def _our_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and r.getMessage().startswith('checkpoint ')]


@pytest.mark.parametrize('damage', DAMAGE)
def test_restore_newest_falls_back_past_a_damaged_checkpoint(tmp_path, caplog, damage):
  saved = _save(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  step_dir = os.path.join(ckpt.directory, '4')
  abstract = _abstract(saved[4], _mesh())
  DAMAGE[damage](step_dir)
  if damage == 'flipped bytes':  # orbax alone restores the flipped array without a word: only the checksum sees it
    unchecked = ocp.StandardCheckpointer().restore(os.path.join(step_dir, 'default'), abstract)
    assert not np.array_equal(unchecked['params']['dense']['kernel'], saved[4]['params']['dense']['kernel'])
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore_newest(abstract)
  _assert_identical(restored, saved[2])
  moved = os.path.join(ckpt.damaged_directory, '4')
  assert ckpt.latest_step() == 2 and not os.path.exists(step_dir) and os.path.isdir(moved)
  warning, = _our_warnings(caplog)
  assert warning.startswith(f'checkpoint 4 in {ckpt.directory} is damaged (') and moved in warning
  assert '\n' not in warning
  if damage == 'flipped bytes':
    assert 'differ from the checksums saved with them: params.dense.kernel' in warning


def test_every_checkpoint_damaged_is_one_line_naming_each(tmp_path):
  saved = _save(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  DAMAGE['truncated data file'](os.path.join(ckpt.directory, '4'))
  DAMAGE['empty _METADATA'](os.path.join(ckpt.directory, '2'))
  with pytest.raises(ValueError) as error:
    ckpt.restore_newest(_abstract(saved[4], _mesh()))
  message = str(error.value)
  assert '\n' not in message and message.startswith(f'no checkpoint in {ckpt.directory} restores: 4 (')
  assert '; 2 (its metadata is unreadable: JSONDecodeError' in message
  assert sorted(os.listdir(ckpt.damaged_directory)) == ['2', '4'] and ckpt.latest_step() is None
  assert checkpoint.Checkpointer(str(tmp_path), keep=3).restore_newest(_abstract(saved[4], _mesh())) is None


def test_moved_aside_twice_keeps_both(tmp_path):
  """A step damaged again after a restart (say, the same bad disk) does not overwrite the first one moved aside."""
  for attempt in range(2):
    saved = _save(tmp_path, steps=(2, 4) if attempt == 0 else (4,))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    DAMAGE['deleted data file'](os.path.join(ckpt.directory, '4'))
    _assert_identical(ckpt.restore_newest(_abstract(saved[4], _mesh())), _host_state(2))
  assert sorted(os.listdir(ckpt.damaged_directory)) == ['4', '4.1']


def test_restoring_a_damaged_step_explicitly_is_one_line_and_moves_nothing(tmp_path):
  saved = _save(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  _flip_bytes(os.path.join(ckpt.directory, '4'))
  with pytest.raises(ValueError) as error:
    ckpt.restore(_abstract(saved[4], _mesh()), step=4)
  message = str(error.value)
  assert '\n' not in message and message.startswith(f'checkpoint 4 in {ckpt.directory} is damaged (1 of 9 arrays')
  assert ckpt.latest_step() == 4 and not os.path.exists(ckpt.damaged_directory)
  _assert_identical(ckpt.restore(_abstract(saved[2], _mesh()), step=2), saved[2])


@pytest.mark.parametrize('other,where', [
    (dict(optimizer=optax.sgd(0.1, momentum=0.9)),
     'opt_state[0].count (only in the checkpoint), opt_state[0].mu (only in the checkpoint), opt_state[0].nu '
     '(only in the checkpoint), opt_state[0].trace (only in this config)'),
    (dict(kernel_rows=128),
     'opt_state[0].mu.dense.kernel (checkpoint (256, 64) float32, this config (128, 64) float32), opt_state[0].nu'),
])
def test_another_tree_is_a_config_error_that_moves_nothing(tmp_path, other, where):
  _save(tmp_path)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  with pytest.raises(ValueError) as error:
    ckpt.restore_newest(_abstract(_host_state(0, **other), _mesh()))
  message = str(error.value)
  assert '\n' not in message and message.startswith(
      f'checkpoint 4 in {ckpt.directory} holds a different train state than this config builds (it differs at '
      f'{where}')
  assert ckpt.latest_step() == 4 and not os.path.exists(ckpt.damaged_directory)


def test_checksums_of_8_devices_verify_on_1(tmp_path, caplog):
  saved = _save(tmp_path, steps=(4,))
  sharded = jax.device_put(saved[4], _shardings(saved[4], _mesh()))
  one = _mesh(1)
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.Checkpointer(str(tmp_path), keep=3).restore_newest(_abstract(saved[4], one))
  _assert_identical(restored, saved[4])
  assert restored['params']['dense']['kernel'].sharding == NamedSharding(one, P('x'))
  assert checkpoint.checksums(restored) == checkpoint.checksums(sharded) == json.load(open(
      tmp_path / 'checkpoints' / '4' / '_CHECKPOINT_METADATA'))['custom_metadata'][checkpoint.CHECKSUMS]
  assert not _our_warnings(caplog)


def test_checksums_see_moved_words():
  """Swapping two elements keeps the plain sum; the index-weighted one changes."""
  x = np.arange(16, dtype=np.float32)
  swapped = x.copy()
  swapped[[3, 11]] = swapped[[11, 3]]
  (a, b), (c, d) = checkpoint.checksums([x])['[0]'], checkpoint.checksums([swapped])['[0]']
  assert a == c and b != d


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  state = _host_state(3)
  manager = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))  # what Checkpointer wrote before checksums
  manager.save(3, args=ocp.args.StandardSave(jax.device_put(state, _shardings(state, _mesh()))))
  manager.wait_until_finished()
  manager.close()
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.Checkpointer(str(tmp_path), keep=3).restore_newest(_abstract(state, _mesh()))
  _assert_identical(restored, state)
  warning, = _our_warnings(caplog)
  assert warning.startswith(f'checkpoint 3 in {tmp_path / "checkpoints"} has no checksums')


def test_no_checkpoint_gives_none(tmp_path):
  assert checkpoint.Checkpointer(str(tmp_path), keep=1).restore_newest(_abstract(_host_state(0), _mesh())) is None


@pytest.mark.parametrize('options,message', [
    (dict(keep=0), 'checkpoint.keep=0 would delete the newest checkpoint too: set keep >= 1'),
    (dict(keep=2, keep_every_steps=0), 'checkpoint.keep_every_steps=0: set None'),
])
def test_keep_below_one_is_refused(tmp_path, options, message):
  with pytest.raises(ValueError, match=message) as error:
    checkpoint.Checkpointer(str(tmp_path), **options)
  assert '\n' not in str(error.value) and not os.path.exists(tmp_path / 'checkpoints')


@pytest.mark.slow
def test_checkpoint_benchmark(tmp_path, capsys):
  jsonl = tmp_path / 'bench.jsonl'
  bench.main(['checkpoint', '--model', 'mixer_s32', '--model_options', TINY_MIXER, '--batch', '8', '--every', '2',
              '--steps', '2', '--repeats', '2', '--workdir', str(tmp_path), '--jsonl', str(jsonl)])
  out = capsys.readouterr().out
  assert 'without checkpoints' in out and 'a save call blocks' in out
  row = json.loads(jsonl.read_text())
  assert row['saves'] == 2 and len(row['step_s_with_saves_repeats']) == 2  # one per timed repeat
  assert row['ratio'] == pytest.approx(row['step_s_with_saves'] / row['step_s'])
  storage, = row['storages']
  assert storage['saves'] == 3 and 0 < storage['save_blocking_s'] < storage['commit_s'] and storage['restore_s'] > 0
  assert storage['storage'] == str(tmp_path) and storage['commit_s_ratio'] == 1
  assert os.listdir(tmp_path) == ['bench.jsonl']  # the checkpoints went with their temporary directory


@pytest.mark.parametrize('args,message', [
    (['--every', '0'], 'argument --every: 0 must be >= 1'),
    (['--repeats', 'x'], "argument --repeats: 'x' is not an integer"),
    (['--every', '3', '--steps', '2'], '--steps 2 < --every 3: a timed repeat would save no checkpoint'),
])
def test_checkpoint_benchmark_refuses_bad_counts_in_one_line(args, message):
  with pytest.raises(SystemExit) as exit:
    bench.main(['checkpoint', '--model', 'mixer_s32', *args])
  assert message in str(exit.value) and '\n' not in str(exit.value)
