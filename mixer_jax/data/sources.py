"""Dataset names -> sources of undecoded examples in a fixed order.

Names:
  * any tfds name, optionally with a version (`cifar10`, `imagenet2012`, `imagenet2012_real`, `imagenet_v2`,
    `oxford_iiit_pet`, `cars196:2.1.0`, ...), read from `data_dir` with `download=False`. A dataset that is not
    prepared there raises at once with the `tfds build` command (and the manual-download hint where tfds has
    one): nothing here ever waits on the network.
  * `fashion_mnist`: prepared on first use from Debian's IDX files by `fashion_mnist.FashionMnist` (the same
    files, features and splits as tfds's builder), so it works offline out of the box.
  * `imagefolder:<root>`: the user's images as `<root>/<split>/<class>/*.{jpg,jpeg,png}` (case-insensitive
    extensions). Classes are the sorted union of the class folders of all splits; examples are `image` (bytes),
    `label` (int64) and `file_name` (path relative to the split folder). Each split is ordered by a hash of the
    file name, a fixed order in which slices like `train[:90%]` take a random-like subset of every class and
    which does not reorder existing files when new ones are added.

Splits are tfds split strings (`train`, `train[:98%]`, `train[1000:]`, `train+validation`) or the objects
`tfds.even_splits` returns, for every source. Split names and the syntax are checked here (naming the
dataset's splits); slice bounds are left to tfds, whose errors are reworded on one line.

`data_dir` defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own default); a data_dir that is a file
or lies under one is an error at once.

A source gives `records(split)` (a tf.data.Dataset, same order every time) and `load(record)` (turns a record
into an example with undecoded image bytes: the identity for tfds, a file read for folders). The split between
the two lets the pipeline shuffle and skip light records (file names) before reading images. It also describes
its examples (`features()`, `label_classes(key)`), so that callers check their keys before building a pipeline.
This module owns names, splits, counts and the one-line "how to get it" errors; it does not decode or shuffle.
"""
import hashlib
import os
import re
from typing import Protocol

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax import cli, paths
from mixer_jax.data import fashion_mnist

IMAGEFOLDER_PREFIX = 'imagefolder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
IMAGEFOLDER_FEATURES = ('image', 'label', 'file_name')
_SPLIT_PART = re.compile(r'\s*([\w-]+)\s*(\[[^\[\]]*\])?\s*')  # a split name, an optional [slice]; parts joined by +


def default_data_dir() -> str:
  return paths.resolve(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def resolve(dataset: str | None) -> str | None:
  """A dataset name with the folder of `imagefolder:<root>` made absolute (`paths.resolve`); tfds names unchanged."""
  if isinstance(dataset, str) and dataset.startswith(IMAGEFOLDER_PREFIX):
    return IMAGEFOLDER_PREFIX + paths.resolve(dataset[len(IMAGEFOLDER_PREFIX):])
  return dataset


class Source(Protocol):
  name: str

  def count(self, split) -> int: ...
  def records(self, split) -> tf.data.Dataset: ...
  def load(self, record: dict) -> dict: ...
  def num_classes(self) -> int: ...
  def features(self) -> list[str]: ...
  def label_classes(self, key: str) -> int | None: ...
  def class_names(self) -> list[str] | None: ...


def check_split(name: str, split, splits) -> None:
  """A ValueError naming `splits` unless `split` is a split string over them (`all` included) or a
  `tfds.even_splits` object; slice bounds are tfds's to check."""
  if not isinstance(split, str):
    return
  parts = split.split('+')
  matches = [_SPLIT_PART.fullmatch(part) for part in parts]
  if not all(matches):
    raise ValueError(f'{name}: malformed split {split!r}: write split names, each with an optional slice, joined by '
                     '+ (e.g. train, train[:90%], train[1000:]+validation)')
  for match in matches:
    if match.group(1) not in (*splits, 'all'):
      raise ValueError(f'{name} has no split {match.group(1)!r}{cli.did_you_mean(match.group(1), splits)}: its '
                       f'splits are {", ".join(splits)}')


class TfdsSource:
  """A prepared tfds dataset; images are kept encoded (SkipDecoding) for the pp's `decode` op."""

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder, data_dir: str):
    self.name, self.builder, self.data_dir = name, builder, data_dir

  def _not_prepared(self) -> FileNotFoundError:
    data_dir = self.data_dir
    command = f'`tfds build {self.name} --data_dir {data_dir}`'
    if self.builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      how = (f'it needs a manual download: put the archives listed in the tfds catalog page of {self.name} in '
             f'{data_dir}/downloads/manual, then run {command}')
    else:
      how = f'run {command} on a machine with network access, or copy a prepared {self.name} folder there'
    return FileNotFoundError(f'dataset {self.name!r} is not prepared in {data_dir}: {how}')

  def records(self, split) -> tf.data.Dataset:
    skip = {k: tfds.decode.SkipDecoding() for k, f in self.builder.info.features.items()
            if isinstance(f, tfds.features.Image)}
    config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True)  # caching is the pipeline's decision
    if self.builder.info.splits:  # else never prepared, or tfds's mock_data: as_dataset tells which
      check_split(self.name, split, list(self.builder.info.splits))
    try:
      return self.builder.as_dataset(split=split, shuffle_files=False, decoders=skip, read_config=config)
    except AssertionError:  # tfds's "could not find data" when the dataset was never prepared
      raise self._not_prepared() from None
    except ValueError as e:
      raise ValueError(f'{self.name}: {e}'.replace('\n', ' ')) from None

  def count(self, split) -> int:
    splits = self.builder.info.splits
    if not splits:  # never prepared (records() says how to fix it), or tfds's mock_data, which has no metadata
      return int(self.records(split).cardinality())
    check_split(self.name, split, list(splits))
    try:
      return splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f'{self.name}: {e}'.replace('\n', ' ')) from None

  def load(self, record):
    return record

  def num_classes(self) -> int:
    classes = self.label_classes('label')
    if classes is None:
      raise ValueError(f'{self.name} has no ClassLabel feature "label"; give num_classes explicitly')
    return classes

  def features(self) -> list[str]:
    return list(self.builder.info.features)

  def label_classes(self, key: str) -> int | None:
    """The classes of feature `key` if it holds class labels (a ClassLabel, or a sequence of them like
    imagenet2012_real's real_label), else None."""
    feature = self._class_label(key)
    return feature.num_classes if feature is not None else None

  def class_names(self) -> list[str] | None:
    """The names of the `label` classes as the dataset gives them (ImageNet: WordNet ids), else None."""
    feature = self._class_label('label')
    return list(feature.names) if feature is not None else None

  def _class_label(self, key: str) -> tfds.features.ClassLabel | None:
    feature = self.builder.info.features[key] if key in self.builder.info.features else None
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    return feature if isinstance(feature, tfds.features.ClassLabel) else None


class ImageFolderSource:
  """`<root>/<split>/<class>/*.{jpg,jpeg,png}`."""

  def __init__(self, root: str):
    self.name = IMAGEFOLDER_PREFIX + root
    self.root = paths.resolve(root)
    layout = f'expected {self.root}/<split>/<class>/*.jpg|jpeg|png'
    if not paths.at(self.root).is_dir():
      state = 'is a file, not a folder' if paths.at(self.root).exists() else 'does not exist'
      raise FileNotFoundError(f'image folder {self.root} {state} ({layout})')
    files = {split: self._list(split) for split in _folders(self.root)}
    files = {split: f for split, f in files.items() if f}
    if not files:
      raise FileNotFoundError(f'image folder {self.root} holds no images ({layout})')
    self.classes = sorted({f.split('/')[0] for split_files in files.values() for f in split_files})
    self._files = files
    self._splits = tfds.core.SplitDict([tfds.core.SplitInfo(name=s, shard_lengths=[len(f)], num_bytes=0)
                                        for s, f in files.items()])

  def _list(self, split) -> list[str]:
    split_dir = paths.join(self.root, split)
    names = [f'{c}/{f.name}' for c in _folders(split_dir) for f in paths.at(paths.join(split_dir, c)).iterdir()
             if f.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(names, key=lambda n: (hashlib.md5(n.encode()).digest(), n))

  def _ranges(self, split) -> list[tuple[str, int, int]]:
    check_split(self.name, split, list(self._files))
    try:
      instructions = tfds.core.splits.AbstractSplit.from_spec(split).to_absolute(self._splits)
    except (KeyError, ValueError) as e:
      raise ValueError(f'{self.name}: {e}'.replace('\n', ' ')) from None
    return [(i.splitname, i.from_ or 0, len(self._files[i.splitname]) if i.to is None else i.to)
            for i in instructions]

  def count(self, split) -> int:
    return sum(to - start for _, start, to in self._ranges(split))

  def records(self, split) -> tf.data.Dataset:
    picked = [(s, n) for s, start, to in self._ranges(split) for n in self._files[s][start:to]]
    label = {c: i for i, c in enumerate(self.classes)}
    return tf.data.Dataset.from_tensor_slices({
        'path': tf.constant([paths.join(self.root, s, n) for s, n in picked], tf.string),
        'file_name': tf.constant([n for _, n in picked], tf.string),
        'label': np.array([label[n.split('/')[0]] for _, n in picked], np.int64)})

  def load(self, record):
    return {'image': tf.io.read_file(record['path']), 'label': record['label'], 'file_name': record['file_name']}

  def num_classes(self) -> int:
    return len(self.classes)

  def features(self) -> list[str]:
    return list(IMAGEFOLDER_FEATURES)

  def label_classes(self, key: str) -> int | None:
    return len(self.classes) if key == 'label' else None

  def class_names(self) -> list[str]:
    return list(self.classes)


def _folders(path: str) -> list[str]:
  """The names of the folders in `path`, sorted."""
  return sorted(p.name for p in paths.at(path).iterdir() if p.is_dir())


def _check_data_dir(data_dir: str) -> None:
  """A data_dir that is a file, or lies in one, is a mistake that tfds would report as a dataset to download."""
  if paths.is_url(data_dir):
    return
  for path in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f'data_dir {data_dir}: {path} is a file, not a folder: give the folder holding the prepared '
                       'tfds datasets (default $TFDS_DATA_DIR, else ~/tensorflow_datasets)')


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    hint = cli.did_you_mean(name.split(':')[0], known)
    raise ValueError(f'unknown dataset {name!r}{hint}: use a tfds name (https://www.tensorflow.org/datasets/'
                     f'catalog), fashion_mnist, or {IMAGEFOLDER_PREFIX}<root> for your own images') from None


def get(dataset: str, data_dir: str | None = None) -> Source:
  """The source for a dataset name (see the module docstring)."""
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f'dataset must be a tfds name, fashion_mnist or {IMAGEFOLDER_PREFIX}<root>, got {dataset!r}')
  if dataset.startswith(IMAGEFOLDER_PREFIX):
    return ImageFolderSource(dataset[len(IMAGEFOLDER_PREFIX):])
  data_dir = paths.resolve(data_dir) or default_data_dir()
  _check_data_dir(data_dir)
  if dataset == fashion_mnist.FashionMnist.name:
    return TfdsSource(dataset, fashion_mnist.builder(data_dir), data_dir)
  return TfdsSource(dataset, _tfds_builder(dataset, data_dir), data_dir)
