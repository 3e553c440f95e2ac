"""Small datasets the tests write themselves: Fashion-MNIST-like IDX files (the real format, learnable labels)."""
import gzip
import os

import numpy as np

from mixer_jax.data import fashion_mnist


def write_idx(path, array: np.ndarray) -> None:
  """A gzipped IDX file as Fashion-MNIST's: big-endian header (type 0x08 = uint8, dims), then the bytes."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fashion_mnist_like(directory: str, *, train: int, test: int, seed: int = 0) -> str:
  """Writes the four Fashion-MNIST IDX files with `train`/`test` 28x28 images whose class (0-9) is a bright
  horizontal band at a class-dependent height, under noise: a tiny model can learn it. Returns `directory`."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (('train', train), ('test', test)):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 96, (n, 28, 28))
    for i, label in enumerate(labels):
      images[i, 2 + 2 * label:4 + 2 * label, 4:24] = 255
    image_file, label_file = fashion_mnist.FILES[split]
    write_idx(os.path.join(directory, image_file), images)
    write_idx(os.path.join(directory, label_file), labels)
  return directory
