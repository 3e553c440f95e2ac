"""Benchmarks, one argparse sub-command each:

  python -m mixer_jax.bench input --pp "decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)"

`input`: writes synthetic photo-like JPEGs of ImageNet-like sizes (about 100 KB each, as ImageNet's ~110 KB
average) to a temporary image folder, runs the train pipeline (`mixer_jax.data.train_iter`) over them and prints
images/s in total and per CPU core (the input pipeline runs on the host CPUs). The logic is
`input_throughput()`; `write_image_folder()` also serves tests.

A new benchmark adds an `_add_<name>_parser(subparsers)` that sets `run=` to its entry function and calls it
from `main`.
"""
import argparse
import os
import tempfile
import time

import numpy as np

# (height, width) of common ImageNet photos: 500 x 375 / 333 at both orientations dominate; mean ~400 x 350.
IMAGENET_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 500), (300, 400), (480, 640))
DEFAULT_PP = 'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,15)|value_range(-1,1)|onehot(1000)'


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """A uint8 RGB image that compresses like a photo: smooth colour fields, edges and fine texture."""
  import tensorflow as tf  # only the benchmark and tests need TF here
  low = rng.uniform(0, 255, (max(height // 48, 2), max(width // 48, 2), 3)).astype(np.float32)
  smooth = tf.image.resize(low[None], (height, width), method='bicubic')[0].numpy()
  edges = 60.0 * (np.add.outer(np.arange(height) // 37, np.arange(width) // 53) % 2)[:, :, None]
  texture = rng.normal(0.0, 18.0, (height, width, 3))
  return np.clip(smooth + edges + texture, 0, 255).astype(np.uint8)


def write_image_folder(root: str, num_images: int, *, sizes=IMAGENET_SIZES, num_classes: int = 10,
                       split: str = 'train', seed: int = 0, quality: int = 90) -> str:
  """`root/<split>/class_<k>/<i>.jpg` with synthetic images, class k = i % num_classes; returns root."""
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    directory = os.path.join(root, split, f'class_{i % num_classes}')
    os.makedirs(directory, exist_ok=True)
    h, w = sizes[i % len(sizes)]
    jpeg = tf.io.encode_jpeg(synthetic_image(h, w, rng), quality=quality)
    tf.io.write_file(os.path.join(directory, f'{i:06d}.jpg'), jpeg)
  return root


def cpu_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def input_throughput(pp: str = DEFAULT_PP, *, batch_size: int = 256, num_images: int = 1024, steps: int = 20,
                     warmup: int = 3, sizes=IMAGENET_SIZES, cache: str | None = None, workdir: str | None = None):
  """Images/s of `train_iter` with `pp` over synthetic JPEGs: {'images_per_s', 'per_core', 'cores', ...}."""
  from mixer_jax import data
  with tempfile.TemporaryDirectory(dir=workdir) as root:
    write_image_folder(root, num_images, sizes=sizes)
    it = data.train_iter(f'imagefolder:{root}', 'train', pp=pp, global_batch_size=batch_size, seed=0,
                         process_index=0, process_count=1, cache=cache)
    for _ in range(warmup):  # tracing, thread pools, the first shuffle window, the page cache
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(it)
    seconds = time.perf_counter() - start
  cores = cpu_cores()
  images_per_s = steps * batch_size / seconds
  return {'images_per_s': images_per_s, 'per_core': images_per_s / cores, 'cores': cores, 'seconds': seconds,
          'batch_shapes': {k: v.shape for k, v in batch.items()}}


def _run_input(args):
  r = input_throughput(args.pp, batch_size=args.batch_size, num_images=args.num_images, steps=args.steps,
                       warmup=args.warmup, cache=args.cache, workdir=args.workdir)
  print(f'input pipeline: {args.pp}')
  print(f'  {args.num_images} synthetic JPEGs of ImageNet-like sizes, batch {args.batch_size}, {args.steps} timed '
        f'steps after {args.warmup} warm-up, cache={args.cache}; batch {r["batch_shapes"]}')
  print(f'  {r["images_per_s"]:.1f} images/s total, {r["per_core"]:.1f} images/s per core ({r["cores"]} CPU cores)')


def _add_input_parser(subparsers):
  p = subparsers.add_parser('input', help='input pipeline throughput on synthetic JPEGs')
  p.add_argument('--pp', default=DEFAULT_PP, help='train pre-processing string')
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--num_images', type=int, default=1024, help='synthetic JPEGs written (one epoch)')
  p.add_argument('--steps', type=int, default=20, help='timed batches')
  p.add_argument('--warmup', type=int, default=3, help='untimed batches first')
  p.add_argument('--cache', choices=('raw', 'decoded'), default=None)
  p.add_argument('--workdir', default=None, help='where the temporary image folder goes (default: $TMPDIR)')
  p.set_defaults(run=_run_input)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m mixer_jax.bench', description=__doc__.split('\n')[0])
  subparsers = parser.add_subparsers(dest='command', required=True)
  _add_input_parser(subparsers)
  args = parser.parse_args(argv)
  args.run(args)


if __name__ == '__main__':
  main()
