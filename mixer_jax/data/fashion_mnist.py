"""Fashion-MNIST prepared offline from the IDX files of Debian's `dataset-fashion-mnist` package.

`apt-get install dataset-fashion-mnist` installs the four original files (the ones tfds's `fashion_mnist`
downloads) in /usr/share/datasets/fashion-mnist/; `FASHION_MNIST_IDX_DIR` or `idx_dir=` points elsewhere.
`FashionMnist` is a tfds builder with the name, version, features (`image` (28, 28, 1) uint8 PNG, `label`
ClassLabel with the 10 Zalando class names) and splits (train 60,000 / test 10,000) of tfds's own, and the same
example keys, so it writes the very layout `tfds build fashion_mnist` writes
(`<data_dir>/fashion_mnist/3.0.1/`): either reads the other's files. Preparing takes about 15 s on two cores.

Processes sharing a data_dir may prepare at the same time: the first to finish wins, the others read its files.

This module owns the IDX reader and the builder; it never touches the network (`try_download_gcs=False`).
"""
import contextlib
import gzip
import io
import logging as std_logging
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IDX_DIR_ENV = 'FASHION_MNIST_IDX_DIR'
DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {  # split -> (images, labels), the names upstream and Debian use
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
_IDX_UINT8 = 0x08  # IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dims


def idx_dir(override: str | None = None) -> str:
  return override or os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR


def read_idx(path: str) -> np.ndarray:
  """A gzipped IDX file (big-endian header, then uint8 data) as a uint8 array of the header's shape."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] != _IDX_UINT8:
    raise ValueError(f'{path} is not a uint8 IDX file (magic {data[:4].hex()})')
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if len(data) != header + int(np.prod(shape)):
    raise ValueError(f'{path}: the header says shape {shape} but the file holds {len(data) - header} bytes')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def missing_files(directory: str) -> list[str]:
  return [name for pair in FILES.values() for name in pair if not os.path.isfile(os.path.join(directory, name))]


def _encode_png(images: np.ndarray) -> list[bytes]:
  # Encoded here in parallel with tf.data: tfds would encode each array in its own TF graph run, 3x slower.
  ds = tf.data.Dataset.from_tensor_slices(images[..., None]).map(tf.io.encode_png,
                                                                 num_parallel_calls=tf.data.AUTOTUNE)
  return [png for batch in ds.batch(10_000).as_numpy_iterator() for png in batch]


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds's `fashion_mnist`, generated from local IDX files instead of downloaded."""
  name = 'fashion_mnist'
  VERSION = tfds.core.Version('3.0.1')  # tfds's version, so the two read each other's prepared files

  # tfds looks for a checksums file next to the builder's code, working the path out through
  # `importlib_resources`, which tensorflow-datasets does not install. Nothing is downloaded: no checksums.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, idx_dir: str | None = None, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao et al., 2017): 28x28 grayscale images of 10 kinds of clothing.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist')

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    directory = idx_dir(self._idx_dir)
    return {split: self._generate_examples(*(os.path.join(directory, f) for f in files))
            for split, files in FILES.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
      raise ValueError(f'{images_path} / {labels_path}: expected (N, 28, 28) images and N labels, got '
                       f'{images.shape} and {labels.shape}')
    # The example index is the key, as in tfds's builder, so both shuffle examples into the same order.
    for index, (png, label) in enumerate(zip(_encode_png(images), labels)):
      yield index, {'image': png, 'label': int(label)}


def builder(data_dir: str, idx_dir_override: str | None = None) -> FashionMnist:
  """The builder over `data_dir`, prepared from the IDX files first if it is not yet."""
  b = FashionMnist(data_dir=data_dir, idx_dir=idx_dir_override)
  with _quiet_tfds():  # a folder being prepared, by this process or another, is no news
    prepared = b.is_prepared()
  if not prepared:
    directory = idx_dir(idx_dir_override)
    missing = missing_files(directory)
    if missing:
      raise FileNotFoundError(
          f'Fashion-MNIST is not prepared in {data_dir} and its IDX files are missing from {directory} '
          f'({", ".join(missing)}): run `apt-get install dataset-fashion-mnist`, or set {IDX_DIR_ENV} to a '
          'folder holding the four files')
    logging.info('preparing Fashion-MNIST in %s from the IDX files in %s (once)', data_dir, directory)
    try:
      with _quiet_tfds():
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except FileExistsError:  # another process sharing data_dir finished first; its files are the same
      b = FashionMnist(data_dir=data_dir, idx_dir=idx_dir_override)
  return b


@contextlib.contextmanager
def _quiet_tfds():
  """Without tfds's account of preparing (progress bars, its "Downloading and preparing" and done lines, warnings
  about the folder being filled): the builder logs one line of its own; errors still raise."""
  tfds.display_progress_bar(False)
  quiet = lambda record: 'Variant folder' not in record.getMessage()
  logger = std_logging.getLogger('absl')
  logger.addFilter(quiet)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logger.removeFilter(quiet)
    tfds.display_progress_bar(True)

