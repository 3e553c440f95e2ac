"""Sources and streams (mixer_jax.data.sources/pipeline/fashion_mnist) and the input benchmark, all offline."""
import gzip
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mixer_jax import bench, data
from mixer_jax.data import fashion_mnist, presets
from fake_data import write_idx
from test_data_ops import global_tf_seed

# Random ops (crop, flip, RandAugment) in the stream, and the file name to identify examples.
TRAIN_PP = ('decode|inception_crop(16, area_min=30)|flip_lr|randaug(2, 15)|value_range(-1, 1)|onehot(3)|'
            'keep("image", "labels", "file_name")')
NAMES_PP = 'keep("file_name")'  # order-only checks need no decoding
EVAL_PP = 'decode|resize(16)|value_range(-1, 1)|onehot(3)|keep("image", "labels", "file_name")'
NUM_TRAIN, NUM_TEST = 45, 13
DEBIAN_FASHION_MNIST = fashion_mnist.DEFAULT_IDX_DIR


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp('images'))
  bench.write_image_folder(root, NUM_TRAIN, sizes=((24, 32), (41, 27)), num_classes=3)
  bench.write_image_folder(root, NUM_TEST, sizes=((30, 30),), num_classes=3, split='test', seed=1)
  return 'imagefolder:' + root


def stream(dataset, n, **kwargs):
  kwargs = {**dict(split='train', global_batch_size=8, seed=1, process_index=0, process_count=1), **kwargs}
  it = data.train_iter(dataset, kwargs.pop('split'), **kwargs)
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def names(batches, key='file_name'):
  return [n.decode() for b in batches for n in b[key]]


# ------------------------------------------------------------------------------------------------ train stream


@pytest.mark.slow
def test_stream_is_a_pure_function_of_seed_and_step(folder):
  # shuffle_buffer 16 < 45 examples: windowed shuffle with a random phase; 14 batches of 8 span 2.5 epochs.
  full = stream(folder, 14, pp=TRAIN_PP, shuffle_buffer=16)
  assert full[0]['image'].shape == (8, 16, 16, 3) and full[0]['image'].dtype == np.float32
  assert full[0]['labels'].shape == (8, 3) and -1 <= full[0]['image'].min() < full[0]['image'].max() <= 1
  with global_tf_seed(99):  # TF's global random state must play no part
    assert_same(stream(folder, 14, pp=TRAIN_PP, shuffle_buffer=16), full)
  for k in (5, 11):  # mid-epoch 0 (position 40 of 45), and in epoch 1
    assert_same(stream(folder, 14 - k, pp=TRAIN_PP, shuffle_buffer=16, start_step=k), full[k:])
  for cache in ('raw', 'decoded'):  # caching changes the cost, not the stream
    assert_same(stream(folder, 3, pp=TRAIN_PP, shuffle_buffer=16, start_step=4, cache=cache), full[4:7])
  other = stream(folder, 2, pp=TRAIN_PP, shuffle_buffer=16, seed=2)
  assert names(other) != names(full[:2])


@pytest.mark.parametrize('shuffle_buffer', [16, 45, 1000])
def test_every_epoch_is_a_new_permutation_of_the_split(folder, shuffle_buffer):
  batches = stream(folder, 15, pp=NAMES_PP, global_batch_size=9, shuffle_buffer=shuffle_buffer)  # 3 epochs
  seen = names(batches)
  epochs = [seen[i * NUM_TRAIN:(i + 1) * NUM_TRAIN] for i in range(3)]
  assert all(sorted(e) == sorted(set(seen)) and len(set(e)) == NUM_TRAIN for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3
  assert epochs[0] != sorted(epochs[0])


def test_resume_skips_whole_epochs_without_reading_them(folder):
  assert_same(stream(folder, 2, pp=NAMES_PP, start_step=30), stream(folder, 32, pp=NAMES_PP)[30:])  # epoch 5
  # Step 10**9 is epoch ~1.8e8: found arithmetically, so it costs what step 0 costs.
  start = time.perf_counter()
  (late,) = stream(folder, 1, pp=NAMES_PP, start_step=10**9)
  assert time.perf_counter() - start < 5 and len(set(late['file_name'])) == 8


@pytest.mark.slow
def test_global_order_is_the_same_on_any_number_of_processes(folder):
  """split_per_process=False: the two processes' rows of each global batch, augmentations included, are the
  single process's batch, also when the stream is re-created at a later step."""
  kwargs = dict(pp=TRAIN_PP, shuffle_buffer=16, split_per_process=False)
  single = stream(folder, 7, **kwargs)
  for start in (0, 4):
    halves = [stream(folder, 7 - start, process_index=i, process_count=2, start_step=start, **kwargs)
              for i in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
    assert halves[0][0]['image'].shape[0] == 4
    assert_same(joined, single[start:])


def test_process_slices_are_disjoint_and_cover_the_split(folder):
  slices = []
  for index in range(2):
    batches = stream(folder, 6, pp=NAMES_PP, process_index=index, process_count=2)
    assert batches[0]['file_name'].shape == (4,)  # local batch = 8 // 2
    slices.append(names(batches)[:NUM_TRAIN // 2 + 1 - index])  # even_splits: 23 + 22 examples
  assert not set(slices[0]) & set(slices[1])
  assert len(set(slices[0]) | set(slices[1])) == NUM_TRAIN
  with pytest.raises(ValueError, match='global_batch_size 9 must be a positive multiple of the process count 2'):
    data.train_iter(folder, 'train', pp=NAMES_PP, global_batch_size=9, seed=0, process_index=0, process_count=2)


def test_train_iter_rejects_bad_arguments(folder):
  base = dict(pp=NAMES_PP, global_batch_size=8, process_index=0, process_count=1)
  for kwargs, words in [(dict(seed=-1), 'seed'), (dict(seed=0, cache='disk'), 'cache'),
                        (dict(seed=0, start_step=-2), 'start_step'), (dict(seed=0, shuffle_buffer=0), 'shuffle'),
                        (dict(seed=0, process_index=2, process_count=2), 'process_index')]:
    with pytest.raises(ValueError, match=words):
      data.train_iter(folder, 'train', **{**base, **kwargs})


# ------------------------------------------------------------------------------------------------ eval stream


def test_eval_sees_every_example_exactly_once_per_pass(folder):
  seen, steps = [], set()
  for index in range(2):  # 13 = 7 + 6 examples over 2 processes, local batch 2 -> 4 steps on both
    ev = data.eval_iter(folder, 'test', pp=EVAL_PP, global_batch_size=4, process_index=index, process_count=2)
    batches = list(ev)
    steps.add((ev.num_steps, len(batches)))
    assert ev.num_examples == NUM_TEST
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.dtype == bool and mask.sum() == 7 - index
    padded = np.concatenate([b['image'] for b in batches])[~mask]
    assert np.all(padded == 0)
    seen += [n for n, m in zip(names(batches), mask) if m]
    assert_same(list(ev), batches)  # re-iterable: one identical pass per evaluation
  assert steps == {(4, 4)}
  assert len(seen) == len(set(seen)) == NUM_TEST
  ev = data.eval_iter(folder, 'test', pp=EVAL_PP, global_batch_size=5, process_index=0, process_count=1,
                      cache='decoded')
  assert ev.num_steps == 3 and sum(b['mask'].sum() for b in ev) == NUM_TEST


# ------------------------------------------------------------------------------------------------ sources


def test_image_folder_labels_splits_and_errors(folder, tmp_path):
  assert data.num_examples(folder, 'train') == NUM_TRAIN and data.num_classes(folder) == 3
  assert data.num_examples(folder, 'train[:20]') == 20 and data.num_examples(folder, 'train[40%:]') == 27
  assert data.num_examples(folder, 'train[10:20]+test') == 10 + NUM_TEST
  ev = data.eval_iter(folder, 'test', pp='keep("label", "file_name")', global_batch_size=13, process_index=0,
                      process_count=1)
  (batch,) = list(ev)
  assert [int(os.path.dirname(n.decode())[-1]) for n in batch['file_name']] == batch['label'].tolist()
  with pytest.raises(ValueError, match="no split 'valid'"):
    data.num_examples(folder, 'valid')
  with pytest.raises(FileNotFoundError, match='<split>/<class>'):
    data.num_examples(f'imagefolder:{tmp_path}/none', 'train')
  with pytest.raises(FileNotFoundError, match='holds no images'):
    data.num_examples(f'imagefolder:{tmp_path}', 'train')


def test_missing_tfds_datasets_fail_at_once_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError, match=f'tfds build cifar10 --data_dir {tmp_path}'):
    data.train_iter('cifar10', 'train', pp=NAMES_PP, global_batch_size=8, seed=0, data_dir=str(tmp_path),
                    process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='manual download'):
    data.num_examples('imagenet2012', 'validation', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='did you mean cifar10'):
    data.num_examples('cifar11', 'train', data_dir=str(tmp_path))
  assert time.perf_counter() - start < 20  # no network wait


@pytest.mark.slow
def test_tfds_paths_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    for dataset, split, pp in [
        ('imagenet2012', 'train', 'decode_jpeg_and_inception_crop(32)|flip_lr|randaug(2, 15)|value_range(-1, 1)|'
                                  'onehot(1000)|keep("image", "labels")'),  # configs/mixer_i1k.py's at 32
        ('imagenet2012', 'validation', presets.eval_pp('mixer', resolution=32)),
        ('cifar10', 'test', 'decode|value_range(-1, 1)|onehot(10)|keep("image", "labels")')]:
      (batch,) = stream(dataset, 1, split=split, pp=pp, global_batch_size=4, data_dir=str(tmp_path))
      assert batch['image'].shape == (4, 32, 32, 3) and batch['labels'].shape[0] == 4
      ev = data.eval_iter(dataset, split, pp=pp, global_batch_size=4, data_dir=str(tmp_path), process_index=0,
                          process_count=1)
      assert (ev.num_examples, ev.num_steps) == (10, 3)
      assert sum(b['mask'].sum() for b in ev) == 10


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_builder_on_small_idx_files(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  idx = tmp_path / 'idx'
  idx.mkdir()
  images = {'train': rng.integers(0, 256, (20, 28, 28)), 'test': rng.integers(0, 256, (7, 28, 28))}
  labels = {'train': np.arange(20) % 10, 'test': np.arange(7)}
  for split, (image_file, label_file) in fashion_mnist.FILES.items():
    write_idx(idx / image_file, images[split])
    write_idx(idx / label_file, labels[split])
  data_dir = str(tmp_path / 'tfds')
  monkeypatch.setenv(fashion_mnist.IDX_DIR_ENV, str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    data.num_examples('fashion_mnist', 'train', data_dir=data_dir)
  monkeypatch.setenv(fashion_mnist.IDX_DIR_ENV, str(idx))
  assert data.num_examples('fashion_mnist', 'train', data_dir=data_dir) == 20
  assert data.num_examples('fashion_mnist', 'test[:3]', data_dir=data_dir) == 3
  assert data.num_classes('fashion_mnist', data_dir=data_dir) == 10
  info = tfds.builder('fashion_mnist', data_dir=data_dir).info  # tfds's own builder reads the same files
  assert info.features['image'].shape == (28, 28, 1) and info.features['label'].names[9] == 'Ankle boot'
  ev = data.eval_iter('fashion_mnist', 'train', pp='decode(channels=1)|central_crop(28)|keep("image", "label")',
                      global_batch_size=8, data_dir=data_dir, process_index=0, process_count=1)
  batches = list(ev)
  mask = np.concatenate([b['mask'] for b in batches])
  got = sorted((int(l), im.tobytes()) for b in batches for l, im, m in zip(b['label'], b['image'], b['mask']) if m)
  want = sorted((int(l), im[:, :, None].astype(np.uint8).tobytes()) for l, im in zip(labels['train'],
                                                                                      images['train']))
  assert mask.sum() == 20 and got == want
  seen = []  # two processes, local batch 10 = each one's whole slice
  for index in range(2):
    (batch,) = stream('fashion_mnist', 1, pp='decode(channels=1)|keep("image")', global_batch_size=20,
                      data_dir=data_dir, process_index=index, process_count=2)
    seen += [im.tobytes() for im in batch['image']]
  assert sorted(seen) == sorted(im for _, im in want)


def test_fashion_mnist_idx_reader_rejects_other_files(tmp_path):
  (tmp_path / 'bad.gz').write_bytes(gzip.compress(b'\0\0\x0d\x01' + (3).to_bytes(4, 'big') + b'abc'))
  with pytest.raises(ValueError, match='not a uint8 IDX'):
    fashion_mnist.read_idx(str(tmp_path / 'bad.gz'))
  (tmp_path / 'short.gz').write_bytes(gzip.compress(b'\0\0\x08\x01' + (5).to_bytes(4, 'big') + b'abc'))
  with pytest.raises(ValueError, match='holds 3 bytes'):
    fashion_mnist.read_idx(str(tmp_path / 'short.gz'))


@pytest.mark.skipif(fashion_mnist.missing_files(DEBIAN_FASHION_MNIST) != [],
                    reason='apt-get install dataset-fashion-mnist')
@pytest.mark.slow
def test_fashion_mnist_from_the_debian_files(tmp_path):
  data_dir = str(tmp_path)
  assert data.num_examples('fashion_mnist', 'train', data_dir=data_dir) == 60_000
  assert data.num_examples('fashion_mnist', 'test', data_dir=data_dir) == 10_000
  for split, per_class in (('train', 6000), ('test', 1000)):
    records = data.sources.get('fashion_mnist', data_dir).records(split)
    labels = np.concatenate([b['label'] for b in records.batch(10_000).as_numpy_iterator()])
    assert np.bincount(labels).tolist() == [per_class] * 10
  (batch,) = stream('fashion_mnist', 1, pp=presets.eval_pp('mixer', resolution=32, num_classes=10),
                    global_batch_size=16, data_dir=data_dir)
  assert batch['image'].shape == (16, 32, 32, 3) and batch['labels'].sum() == 16


# ------------------------------------------------------------------------------------------------ benchmark


def test_input_benchmark_command(capsys, tmp_path):
  bench.main(['input', '--pp', 'decode_jpeg_and_inception_crop(32)|flip_lr|randaug(2,15)|value_range(-1,1)',
              '--batch_size', '4', '--num_images', '8', '--steps', '2', '--warmup', '1', '--workdir',
              str(tmp_path)])
  out = capsys.readouterr().out
  assert 'images/s total' in out and 'per core' in out and "'image': (4, 32, 32, 3)" in out
