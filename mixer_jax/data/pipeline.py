"""Train and eval streams: source records -> this process's slice -> order -> pp -> local batches (numpy).

Train (`train_iter`). The process reads `tfds.even_splits(split, process_count)[process_index]` (disjoint
slices that together cover the split; sizes differ by at most one) and repeats it forever. Epoch e of the
slice is a *stateless windowed shuffle*: consecutive windows of `shuffle_buffer` records are each permuted
by a permutation drawn from (seed, e, window); the windows start at a random offset that changes every epoch,
so which records share a window changes too. With `shuffle_buffer` >= the slice size the epoch is one uniformly
random permutation (the case for every dataset but ImageNet-sized ones on few hosts). Batch k holds stream
positions [k * local_batch, (k + 1) * local_batch), crossing epoch boundaries like `repeat()` does.

So the stream is a pure function of (dataset, split, pp, seed, shuffle_buffer, step, process index/count):
`train_iter(..., start_step=k)` yields exactly batches k, k+1, ... of a stream started at 0. It starts at
epoch floor(k * local_batch / n) without touching the earlier epochs and skips the rest of that epoch on
undecoded records (file names for image folders), so resuming decodes nothing it throws away. Random pp ops
get a `_seed` folded from (seed, the example's position in the global stream: batch k, process i, row j ->
k * global_batch + i * local_batch + j), so augmentations are bit-identical in a resumed run. No shuffle
here uses TF's global random state (`tf.data.Dataset.shuffle` would: its op seed mixes with
`tf.random.set_seed`).

Eval (`eval_iter`). Each process reads its slice in order, preprocesses it, appends all-zero examples with
`mask=False`, and stops after `num_steps = ceil(largest slice / local_batch)` batches, the same number on every
process, so every example of the split is seen exactly once per pass (mask.sum() over processes == size).

Caching (`cache=`), in host memory, per process; `train_iter` fills it when created (one pass over the slice:
overlapping epochs must find it complete), `eval_iter` during its first pass:
  * None: read from disk every epoch.
  * 'raw': the undecoded records of the slice (about the dataset's size on disk: ImageNet train ~140 GB in
    total, split over processes; CIFAR-10 ~130 MB; Fashion-MNIST ~35 MB).
  * 'decoded': the output of the pp's leading deterministic ops (up to the first random op), e.g. decoded
    uint8 pixels, H * W * C bytes per image (ImageNet train at full size ~200 GB; CIFAR-10 150 MB), or for an
    eval pp the final float32 tensors (224x224x3 -> 602 KB per image; ImageNet validation ~30 GB). A train pp
    starting with a random op (decode_jpeg_and_inception_crop) caches exactly what 'raw' caches.
Shuffling holds up to four windows of `shuffle_buffer` records (the one being consumed, the next one ready,
one filling, and at the end of an epoch the next epoch's first): at most 4 * shuffle_buffer * record size,
e.g. 22 GB for the default 50,000 ImageNet JPEGs (110 KB each; lower shuffle_buffer to trade shuffling for
memory), 0.1 GB for CIFAR-10, a few MB for image folders, whose records are file names.

This module owns ordering, process slices, seeds, padding and caching; the ops are `ops.py`'s, the sources
`sources.py`'s. It yields host numpy arrays: the trainer turns them into global jax.Arrays.
"""
import dataclasses
import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax.data import ops, sources

DEFAULT_SHUFFLE_BUFFER = 50_000  # vit_jax's default; big_vision's ImageNet recipe uses 250,000
CACHE_MODES = (None, 'raw', 'decoded')
MASK_KEY = 'mask'
_SHUFFLE_STREAM, _AUGMENT_STREAM, _EVAL_STREAM = 0, 1, 2  # independent stateless seed streams
# Every function handed to tf.data is plain graph code (tf.cond/switch_case, no Python control flow on tensors):
# skipping AutoGraph's source conversion cuts building a RandAugment pipeline from ~10 s to ~1 s.
_graph = tf.autograph.experimental.do_not_convert


def _processes(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
    raise ValueError(f'process_index {index!r} / process_count {count!r}: need 0 <= index < count')
  return index, count


def _local_batch(global_batch_size, process_count: int) -> int:
  if not (isinstance(global_batch_size, int) and global_batch_size > 0 and global_batch_size % process_count == 0):
    raise ValueError(f'global_batch_size {global_batch_size!r} must be a positive multiple of the process count '
                     f'{process_count}')
  return global_batch_size // process_count


def _process_split(split, index: int, count: int):
  if not isinstance(split, str):
    raise ValueError(f'split must be a tfds split string like "train" or "train[:98%]", got {split!r}')
  return split if count == 1 else tfds.even_splits(split, count)[index]


def _prepare(source, split, pipeline: ops.Pipeline, cache):
  """(records in their fixed order, fn(record, seed) -> example): cached per `cache`, the rest left to fn."""
  if cache not in CACHE_MODES:
    raise ValueError(f'cache must be one of {CACHE_MODES}, got {cache!r}')
  records, load, todo = source.records(split), source.load, pipeline
  if cache:
    prefix, todo = pipeline.split_deterministic() if cache == 'decoded' else (ops.Pipeline(()), pipeline)
    records = records.map(_graph(lambda r: prefix(source.load(r))), tf.data.AUTOTUNE).cache()
    load = dict

  def fn(record, seed):
    example = todo({**load(record), ops.SEED_KEY: seed})
    return {k: v for k, v in example.items() if not k.startswith('_')}
  return records, fn


def _permuted(batch, seed):
  rows = tf.shape(tf.nest.flatten(batch)[0])[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(rows), seed)
  return tf.nest.map_structure(lambda t: tf.gather(t, order), batch)


def _shuffled_epoch(records: tf.data.Dataset, num: int, window: int, seed) -> tf.data.Dataset:
  """The epoch's records permuted within windows of `window` that start at a random offset (see docstring)."""
  fold = tf.random.experimental.stateless_fold_in
  # ragged_batch: records with variable-length features (e.g. decoded images of a 'decoded' cache) batch too.
  if window >= num:  # one window: a uniformly random permutation of the epoch
    windows = records.ragged_batch(num)
  else:  # the first window is [0, phase): the others are shifted by a different phase every epoch
    phase = tf.random.stateless_uniform([], fold(seed, -1), 0, window, tf.int64)
    windows = records.take(phase).ragged_batch(window).concatenate(records.skip(phase).ragged_batch(window))
  shuffled = windows.enumerate().map(_graph(lambda k, w: _permuted(w, fold(seed, k))))
  shuffled = shuffled.prefetch(1).unbatch()  # the next window fills while this one is consumed: no stall
  if not any(isinstance(s, tf.RaggedTensorSpec) for s in tf.nest.flatten(shuffled.element_spec)):
    return shuffled
  # One image's rows share a width: back to dense tensors.
  return shuffled.map(_graph(lambda r: tf.nest.map_structure(
      lambda t: t.to_tensor() if isinstance(t, tf.RaggedTensor) else t, r)))


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep the order
  options.threading.max_intra_op_parallelism = 1  # parallelism comes from many examples at once (big_vision)
  return ds.with_options(options)


def _numpy_batches(ds: tf.data.Dataset, dataset: str, split) -> Iterator[dict[str, np.ndarray]]:
  """The batches as numpy. An example that cannot be read or pre-processed (a file that is no image, a file gone
  since the listing) is a ValueError naming the dataset: TF reports it by type, with a stack but no file name."""
  try:
    yield from ds.as_numpy_iterator()
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError) as error:
    reason = error.message.splitlines()[0].rsplit(': ', 1)[-1]  # TF's last clause says what failed
    raise ValueError(f'{dataset} {split}: an example failed to load or pre-process ({reason}): an image folder must '
                     'hold only readable JPEG and PNG files, and the pp must suit every example') from None


def _seed_key(seed, stream: int) -> tf.Tensor:
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**63):
    raise ValueError(f'seed must be an int in [0, 2**63), got {seed!r}')
  return tf.constant([int(seed), stream], tf.int64)


def train_iter(dataset: str, split: str, *, pp: str, global_batch_size: int, seed: int, start_step: int = 0,
               data_dir: str | None = None, process_index: int | None = None, process_count: int | None = None,
               shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, cache: str | None = None, prefetch: int = 2,
               split_per_process: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of this process's slice: dicts of numpy arrays with the pp's keys, leading dim local batch.

  local batch = global_batch_size // process_count. Batch k depends only on (dataset, split, pp, seed,
  shuffle_buffer, k, process index/count), so `start_step=k` resumes exactly (module docstring).

  `split_per_process=False` makes the global batches independent of the number of processes: every process
  walks the same globally shuffled stream of undecoded records (reading all of them) and pre-processes only
  its own rows of each global batch, with the seeds a single process would use. A run then sees the same data
  on 1 host or 64, and resumes exactly on another number of hosts; the price is that every process reads the
  whole split (fine for CIFAR-sized data, not for ImageNet, which should keep the default).
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, count)
  if not (isinstance(start_step, (int, np.integer)) and start_step >= 0):
    raise ValueError(f'start_step must be a non-negative int, got {start_step!r}')
  start_step = int(start_step)
  if not (isinstance(shuffle_buffer, int) and shuffle_buffer >= 1):
    raise ValueError(f'shuffle_buffer must be a positive int, got {shuffle_buffer!r}')
  shuffle_key, augment_key = _seed_key(seed, _SHUFFLE_STREAM), _seed_key(seed, _AUGMENT_STREAM)
  pipeline = ops.parse(pp)
  source = sources.get(dataset, data_dir)
  split_here = _process_split(split, index, count) if split_per_process else split
  num = source.count(split_here)
  if num < 1:
    raise ValueError(f'{dataset} {split!r} gives process {index} of {count} no examples: use a larger split or '
                     'fewer processes')
  records, preprocess = _prepare(source, split_here, pipeline, cache)
  if cache:  # filled now, in one pass: epochs overlap (the next starts early) and a cache takes one writer
    records.reduce(np.int64(0), lambda n, _: n + 1)
  fold = tf.random.experimental.stateless_fold_in

  stride = local if split_per_process else global_batch_size  # stream positions per step on this process
  first_epoch, offset = divmod(start_step * stride, num)

  @_graph
  def epoch(e):
    return _shuffled_epoch(records, num, shuffle_buffer, fold(shuffle_key, e)).skip(
        tf.where(e == first_epoch, tf.constant(offset, tf.int64), 0))

  @_graph
  def example(position, record):
    if split_per_process:  # position counts this process's stream: place it in the global batch
      position = position // local * global_batch_size + index * local + position % local
    return preprocess(record, fold(augment_key, position))

  # interleave of one: flat_map's order, but the next epoch starts filling its first window in the background.
  ds = tf.data.Dataset.range(first_epoch, 2**62).interleave(epoch, cycle_length=1, num_parallel_calls=1,
                                                           deterministic=True)
  ds = ds.enumerate(start=start_step * stride)
  if not split_per_process:  # this process's rows of each global batch, still undecoded
    ds = ds.filter(_graph(lambda position, record: position % global_batch_size // local == index))
  ds = ds.map(example, tf.data.AUTOTUNE)
  ds = _options(ds.batch(local, drop_remainder=True))
  return _numpy_batches(ds.prefetch(prefetch) if prefetch else ds, dataset, split)


@dataclasses.dataclass(frozen=True)
class EvalIter:
  """One pass over the split per `iter()`: `num_steps` batches with the pp's keys plus `mask` (bool)."""
  dataset: tf.data.Dataset
  num_steps: int  # the same on every process
  num_examples: int  # of the whole split
  local_batch_size: int
  dataset_name: str  # these two name the data in errors
  split: str

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _numpy_batches(self.dataset, self.dataset_name, self.split)

  def __len__(self) -> int:
    return self.num_steps


def eval_iter(dataset: str, split: str, *, pp: str, global_batch_size: int, data_dir: str | None = None,
              process_index: int | None = None, process_count: int | None = None,
              cache: str | None = None, prefetch: int = 2) -> EvalIter:
  """Every example of the split exactly once per pass, padded to whole batches, `mask` marking real ones."""
  index, count = _processes(process_index, process_count)
  local = _local_batch(global_batch_size, count)
  pipeline = ops.parse(pp)
  source = sources.get(dataset, data_dir)
  total = source.count(_process_split(split, 0, 1))
  # tfds.even_splits hands the extra examples to the first processes: process 0's slice is the largest.
  num_steps = math.ceil(source.count(_process_split(split, 0, count)) / local)
  records, preprocess = _prepare(source, _process_split(split, index, count), pipeline, cache)
  eval_key = _seed_key(index, _EVAL_STREAM)  # random eval ops (test-time augmentation) repeat every pass
  fold = tf.random.experimental.stateless_fold_in

  @_graph
  def example(position, record):
    return {**preprocess(record, fold(eval_key, position)), MASK_KEY: tf.constant(True)}

  # Padding: zeros shaped like the split's first example (static shapes may be unknown, e.g. after `decode`;
  # the whole split's first example exists even when this process's slice is empty).
  first, preprocess_first = _prepare(source, _process_split(split, 0, 1), pipeline, None)
  zeros = _graph(lambda r: {**tf.nest.map_structure(tf.zeros_like, preprocess_first(r, eval_key)),
                            MASK_KEY: tf.constant(False)})
  padding = first.take(1).map(zeros).cache().repeat()
  ds = records.enumerate().map(example, tf.data.AUTOTUNE)
  ds = _options(ds.concatenate(padding).take(num_steps * local).batch(local))
  return EvalIter(ds.prefetch(prefetch) if prefetch else ds, num_steps, total, local, dataset, str(split))


def num_examples(dataset: str, split: str, data_dir: str | None = None) -> int:
  return sources.get(dataset, data_dir).count(_process_split(split, 0, 1))


def num_classes(dataset: str, data_dir: str | None = None) -> int:
  """Classes of the dataset's `label` (tfds ClassLabel, or the class folders of an image folder)."""
  return sources.get(dataset, data_dir).num_classes()
