"""Classification evaluation: top-1, top-5 and loss over every example of a split, sharded over the mesh.

As big_vision's classification evaluator: labels are one-hot or multi-hot vectors, a prediction is correct when
the label at the arg-max is positive, and an example counts when it is real (the stream's padding `mask`) and
has at least one positive label, which drops ImageNet-ReaL's 3,163 unlabelled validation images and changes
nothing for one-hot labels. Sums are global (all devices, all processes); ratios divide by the global count.

This module owns the evaluator's data stream and jitted step (`make_step`, which `mixer_jax.aot` and
`mixer_jax.bench` compile too). It must not train, checkpoint or write metrics.
"""
import functools
import time

import jax
import jax.numpy as jnp

from mixer_jax import data, losses, sharding

BATCH_KEYS = ('image', 'labels', 'mask')


def make_step(predict_fn, loss_name: str, mesh, variables_shardings):
  """jit of (variables, batch) -> masked sums of loss, top-1, top-5 and count over one global batch.

  `predict_fn(variables, images) -> (logits, out)` runs the model in inference mode. The same arguments give the
  same jitted function, so a run's entries that differ only in their data (ImageNet's val, v2 and ReaL) compile
  it once, as big_vision's cached `get_eval_fn` does.
  """
  leaves, treedef = jax.tree.flatten(variables_shardings)
  return _jitted_step(predict_fn, loss_name, mesh, treedef, tuple(leaves))


@functools.lru_cache(maxsize=8)  # a few runs' worth: each entry keeps its model and compiled programs alive
def _jitted_step(predict_fn, loss_name: str, mesh, shardings_treedef, shardings_leaves):
  loss_of = losses.loss_fn(loss_name)

  def step(variables, batch):
    logits, _ = predict_fn(variables, batch['image'])
    labels = batch['labels']
    weight = batch['mask'].astype(jnp.float32) * (labels.max(axis=-1) > 0)
    correct = lambda k: jnp.sum(weight * losses.topk_correct(logits, labels, min(k, labels.shape[-1])))
    return dict(loss=jnp.sum(weight * loss_of(logits, labels)), top1=correct(1), top5=correct(5),
                count=jnp.sum(weight))

  batch = sharding.batch_sharding(mesh)
  variables_shardings = jax.tree.unflatten(shardings_treedef, shardings_leaves)
  return jax.jit(step, in_shardings=(variables_shardings, {k: batch for k in BATCH_KEYS}),
                 out_shardings=sharding.replicated(mesh))


class Evaluator:
  """Top-1, top-5, mean loss and the example count over one pass of `split`, and the throughput in images/s after
  the first (compiling) batch.

  Fields: `split` and `pp` (its batches must hold `image` and one-hot or multi-hot `labels`); `dataset`,
  `data_dir` and `batch_size` (global) default to the run's (`defaults`), as does the loss.
  """

  def __init__(self, predict_fn, mesh, *, variables_shardings, defaults, split: str, pp: str,
               dataset: str | None = None, data_dir: str | None = None, batch_size: int | None = None):
    batch_size = batch_size or defaults['batch_size']
    sharding.check_batch_size(batch_size, mesh)
    self.mesh = mesh
    self.stream = data.eval_iter(dataset or defaults['dataset'], split, pp=pp, global_batch_size=batch_size,
                                 data_dir=data_dir or defaults['data_dir'])
    self.step = make_step(predict_fn, defaults['loss'], mesh, variables_shardings)

  def run(self, variables):
    """Yields (metric, value): top1, top5, loss, count, images_per_s. Every process takes part."""
    totals, start, timed = None, None, 0
    for batch in self.stream:
      batch = sharding.global_batch({k: batch[k] for k in BATCH_KEYS}, self.mesh)
      sums = self.step(variables, batch)
      if totals is None:
        jax.block_until_ready(sums)
        totals, start = sums, time.perf_counter()
      else:
        totals = jax.tree.map(jnp.add, totals, sums)
        timed += batch['image'].shape[0]
    if totals is None:
      raise ValueError('the evaluation split gave no batches: check the split string and the data')
    totals = jax.device_get(totals)
    elapsed = time.perf_counter() - start
    count = max(float(totals['count']), 1.0)
    yield from dict(top1=float(totals['top1']) / count, top5=float(totals['top5']) / count,
                    loss=float(totals['loss']) / count, count=int(totals['count']),
                    images_per_s=timed / elapsed if timed else 0.0).items()

  @staticmethod
  def summary(metrics: dict) -> str:
    return (f'top-1 {metrics["top1"]:.4f} top-5 {metrics["top5"]:.4f} loss {metrics["loss"]:.4f} on '
            f'{metrics["count"]} examples')
