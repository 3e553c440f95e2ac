"""Input pipeline: tfds / Fashion-MNIST / image folders -> tf.data -> per-process numpy batches.

  train_iter(dataset, split, *, pp, global_batch_size, seed, start_step=0, ...)  endless, resumable batches
  eval_iter(dataset, split, *, pp, global_batch_size, ...)   one padded pass per iter(), with a `mask`
  num_examples(dataset, split), num_classes(dataset)
  ops.parse(pp)              the pre-processing mini-language ("decode|resize_small(256)|central_crop(224)|...")
  presets.eval_pp(family)    the evaluation pp a family's checkpoints expect (eval.py); recipes write their own

Datasets are named as in `sources` (a tfds name, `fashion_mnist`, or `imagefolder:<root>`); ordering, process
slices, seeds, caching and padding are `pipeline`'s. The package yields host numpy arrays and never touches
devices or the network.
"""
import tensorflow as tf

# The input pipeline runs on host CPUs: TensorFlow must never claim accelerator memory that JAX needs.
tf.config.set_visible_devices([], 'GPU')

from mixer_jax.data import ops, presets, sources  # noqa: E402
from mixer_jax.data.pipeline import EvalIter, eval_iter, num_classes, num_examples, train_iter

__all__ = ['EvalIter', 'eval_iter', 'num_classes', 'num_examples', 'ops', 'presets', 'sources', 'train_iter']
