"""Few-shot linear probe: big_vision's closed-form ridge regression on a frozen representation.

The Mixer paper's "linear 5-shot" accuracies (Fig. 3 right, Fig. 4) are this probe (big_vision's
`evaluators/fewshot_lsr.py`, reference/recipes.md section 8):

  1. Features: one pass over the whole train and test split through a jitted `predict_fn` whose outputs
     (`out[representation_layer]`, labels, mask) are replicated, i.e. all-gathered: every process ends with the
     full [N, D] matrices on host, padding rows dropped. Done once per `Evaluator.run`; every shot count and seed
     reuses them. Rows follow the stream, whose order is fixed for a given process count: a run draws the same
     shot sets at every evaluation, but 1 and N processes draw different ones (per-seed numbers differ a little).
  2. Per seed s and shot count k: per class, a permutation of that class's train indices drawn from
     `np.random.default_rng(s)`, first k kept. Classes are visited in sorted order with the same generator, so
     for one seed the k-shot set is a prefix of every larger one (5-shot is contained in 10-shot).
  3. Whitening with the few-shot set's per-dimension mean and std (std + 1e-5), a constant feature of 100
     appended (a bias that the l2 penalty barely touches), targets one-hot in {-1, +1}.
  4. Ridge regression through one symmetric eigendecomposition of the smaller Gram matrix (the same W either way):
     N >= D: eigh(XᵀX) = QΛQᵀ, W = Q (Λ + λ)⁻¹ Qᵀ Xᵀy;  N < D: eigh(XXᵀ) = QΛQᵀ, W = XᵀQ (Λ + λ)⁻¹ Qᵀ y.
  5. Accuracy of argmax(x_test_whitened @ W), the test set whitened with the few-shot set's statistics.

The solve is numpy float64 on the host (big_vision jits it on the CPU backend in float32): it never competes with
training for accelerator memory, and float64 keeps the eigenvalues of a rank-deficient Gram matrix (1-shot: rank
<= the number of classes) accurate. The eigh of the min(N, D+1)-square Gram matrix dominates the cost: for
25 shots x 100 classes at D = 2048 (a 2049-square eigh), ~10 s per solve measured on 2 busy CPU cores, less on a
many-core host (12 solves per evaluation with the defaults). Every process computes the same metrics; the caller
writes them from process 0.

A class with fewer train examples than the largest shot count is a ValueError naming the class (big_vision
assumes enough): a probe quietly computed on fewer shots would not be comparable with published numbers.

This module owns the probe's evaluator (its two data streams and jitted feature step), feature extraction and the
probe's math. It must not train, checkpoint or write metrics; it reads data only through `mixer_jax.data.eval_iter`.
"""
import functools
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax import data, sharding

PP = 'decode|resize(256)|central_crop(224)|value_range(-1,1)|keep("image","label")'
DEFAULTS = dict(
    dataset=None,  # required: a tfds name, `fashion_mnist` or `imagefolder:<root>` (mixer_jax.data.sources)
    train_split='train',  # where the k shots per class are drawn from
    test_split='test',
    pp=PP,  # must keep an integer `label`; adapt the sizes to the model's resolution
    batch_size=256,  # global; a multiple of the data-parallel devices and of the process count
    shots=(1, 5, 10, 25),
    seeds=3,  # number of random shot selections (seeds 0 .. seeds-1); metrics average over them
    l2_reg=2.0**10,
    representation_layer='pre_logits',  # key of the model's `out` dict
    data_dir=None,  # tfds data_dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
    cache=None,  # eval_iter cache mode; None re-reads the split at every evaluation
    name=None,  # metric name; None: the dataset name without version or folder path
)
# big_vision's configs/common_fewshot.py: metric name -> (dataset, train split, test split). ImageNet's first
# 65,000 train images hold at least 30 of every class; it and Cars need manual downloads.
BIG_VISION_DATASETS = {
    'caltech': ('caltech101', 'train', 'test'),
    'cars': ('cars196:2.1.0', 'train', 'test'),
    'cifar100': ('cifar100', 'train', 'test'),
    'dtd': ('dtd', 'train', 'test'),
    'pets': ('oxford_iiit_pet', 'train', 'test'),
    'uc_merced': ('uc_merced', 'train[:1000]', 'train[1000:]'),
    'imagenet': ('imagenet2012', 'train[:65000]', 'validation'),
}
STD_EPS = 1e-5
BIAS = 100.0

# (variables, images) -> (logits, out), in inference mode
PredictFn = Callable[[Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


# --- The probe's math (host numpy, float64) ---------------------------------------------------------------

def design_matrices(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both sets whitened with the train set's per-dimension mean and std (+1e-5), a column of 100 appended."""
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + STD_EPS

  def design(x):
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS)], axis=1)
  return design(train_x), design(test_x)


def ridge_regression(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_W |xW - y|² + l2_reg |W|², [D, C], through eigh of the smaller of XᵀX [D, D] and XXᵀ [N, N]."""
  n, d = x.shape
  if n >= d:
    eigvals, q = np.linalg.eigh(x.T @ x)
    lhs, rhs = q, q.T @ (x.T @ y)
  else:  # W = Xᵀ(XXᵀ + λI)⁻¹y: the same minimiser, the Gram matrix of the examples instead of the features
    eigvals, q = np.linalg.eigh(x @ x.T)
    lhs, rhs = x.T @ q, q.T @ y
  return (lhs / (eigvals + l2_reg)) @ rhs


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, l2_reg: float, classes: np.ndarray) -> float:
  """Fits the whitened ridge probe on (train_x, train_y) and returns its top-1 accuracy on the test set."""
  x, x_test = design_matrices(train_x, test_x)
  targets = np.where(np.asarray(train_y)[:, None] == classes[None, :], 1.0, -1.0)
  w = ridge_regression(x, targets, l2_reg)
  predicted = classes[np.argmax(x_test @ w, axis=1)]
  return float(np.mean(predicted == np.asarray(test_y)))


def select_shots(labels: np.ndarray, k: int, *, seed: int, classes: Sequence[int] | None = None) -> np.ndarray:
  """Indices of k random examples of each class (class-major order), a pure function of (labels, k, seed)."""
  labels = np.asarray(labels)
  classes = np.unique(labels) if classes is None else classes
  rng = np.random.default_rng(seed)
  picked = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if len(members) < k:
      raise ValueError(f'class {c} has {len(members)} training examples, fewer than the {k} shots asked for: '
                       'lower `shots` or use a larger train split')
    picked.append(rng.permutation(members)[:k])
  return np.concatenate(picked)


def _check_split(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or not len(y):
    raise ValueError(f'{what} features must be [N, D] and labels [N] with N > 0, got {x.shape} and {y.shape}')
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{what} labels must be integers, got {y.dtype}')
  return x, y


def fewshot_accuracy(train_x, train_y, test_x, test_y, *, shots: Sequence[int] = DEFAULTS['shots'],
                     seeds: int = DEFAULTS['seeds'], l2_reg: float = DEFAULTS['l2_reg'],
                     num_classes: int | None = None) -> dict[int, list[float]]:
  """{k: [test accuracy of the k-shot probe with seed s for s in range(seeds)]}.

  Classes are 0 .. num_classes-1, or those present in train_y when num_classes is None; every class needs at
  least max(shots) train examples.
  """
  train_x, train_y = _check_split(train_x, train_y, 'train')
  test_x, test_y = _check_split(test_x, test_y, 'test')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'train features have {train_x.shape[1]} dimensions but test features {test_x.shape[1]}')
  shots = tuple(shots)
  if not shots or not all(isinstance(k, (int, np.integer)) and k >= 1 for k in shots):
    raise ValueError(f'shots must be positive ints, got {shots!r}')
  if not (isinstance(seeds, (int, np.integer)) and seeds >= 1):
    raise ValueError(f'seeds (the number of shot selections) must be a positive int, got {seeds!r}')
  if not (isinstance(l2_reg, (int, float, np.number)) and np.isfinite(l2_reg) and l2_reg > 0):
    raise ValueError(f'l2_reg must be a positive number, got {l2_reg!r}')
  if num_classes is None:
    classes = np.unique(train_y)
  else:
    classes = np.arange(num_classes)
    bad = [y for y in (train_y, test_y) if y.min() < 0 or y.max() >= num_classes]
    if bad:
      raise ValueError(f'labels must lie in [0, {num_classes}), got {bad[0].min()}..{bad[0].max()}')
  select_shots(train_y, max(shots), seed=0, classes=classes)  # fails before any solve if a class is too small
  result = {}
  for k in shots:
    result[int(k)] = []
    for seed in range(seeds):
      idx = select_shots(train_y, k, seed=seed, classes=classes)
      result[int(k)].append(linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y, l2_reg=l2_reg,
                                                  classes=classes))
  return result


# --- Features (devices -> host) ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)  # a few runs' worth: each entry keeps its model and compiled programs alive
def make_step(predict_fn: PredictFn, mesh, layer: str = DEFAULTS['representation_layer']):
  """jit of (variables, batch) -> (features float32 [B, D], label, mask) of one global batch, replicated: GSPMD
  all-gathers the batch, so every process can read all of it on host. The same arguments give the same jitted
  function, so a run's probes (every train and test split of every dataset) compile it once per batch shape."""
  def gather(variables, batch):
    _, out = predict_fn(variables, batch['image'])
    if layer not in out:
      raise ValueError(f'representation_layer {layer!r} is not among the model outputs {sorted(out)}')
    features = out[layer]
    return features.reshape(features.shape[0], -1).astype(jnp.float32), batch['label'], batch['mask']
  return jax.jit(gather, out_shardings=sharding.replicated(mesh))


def extract(step, variables, eval_iter, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], labels int [N]) of every real example of one pass over `eval_iter` through `step`
  (`make_step`).

  `variables` are what the step's predict_fn expects, already placed on `mesh` (or host arrays, which jit
  replicates). `eval_iter` yields this process's batches with `image`, an integer `label` and `mask`
  (`mixer_jax.data.eval_iter`); all processes must call this together. Rows come in stream order, padding
  (mask False) dropped; every process returns the same arrays.
  """
  features, labels = [], []

  def collect(outputs):
    f, y, mask = jax.device_get(outputs)
    mask = np.asarray(mask, bool)
    features.append(f[mask])
    labels.append(y[mask])

  pending = None
  for batch in eval_iter:
    if 'label' not in batch or 'image' not in batch:
      raise ValueError(f'few-shot batches need `image` and an integer `label`, got keys {sorted(batch)}: '
                       'end the pp with keep("image", "label")')
    label = np.asarray(batch['label'])
    if label.ndim != 1 or not np.issubdtype(label.dtype, np.integer):
      raise ValueError(f'few-shot labels must be integer class ids [batch], got {label.dtype} {label.shape}: '
                       'drop `onehot` from the pp')
    batch = sharding.global_batch(
        {'image': batch['image'], 'label': label.astype(np.int32), 'mask': batch['mask']}, mesh)
    outputs = step(variables, batch)
    if pending is not None:  # fetch batch i-1 while batch i runs: the device never waits for the host
      collect(pending)
    pending = outputs
  if pending is None:
    raise ValueError('the eval stream yielded no batches')
  collect(pending)
  return np.concatenate(features), np.concatenate(labels)


# --- The evaluator ----------------------------------------------------------------------------------------

def _default_name(dataset: str) -> str:
  """`cars196:2.1.0` -> `cars196`; `imagefolder:/data/flowers/` -> `flowers`."""
  if dataset.startswith(data.sources.IMAGEFOLDER_PREFIX):
    return os.path.basename(os.path.normpath(dataset[len(data.sources.IMAGEFOLDER_PREFIX):]))
  return dataset.split(':')[0]


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`cfg` (a dict or ConfigDict) over DEFAULTS; unknown keys and a missing dataset are errors."""
  cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f'unknown few-shot config field(s) {", ".join(unknown)}; known: {", ".join(DEFAULTS)}')
  cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
  if not cfg['dataset']:
    raise ValueError('the few-shot config needs a dataset (a tfds name, fashion_mnist or imagefolder:<root>)')
  if cfg['name'] is None:
    cfg['name'] = _default_name(cfg['dataset'])
  cfg['shots'] = tuple(int(k) for k in cfg['shots'])
  return cfg


class Evaluator:
  """Few-shot probe accuracies of the representation `predict_fn(variables, images)[1][representation_layer]`.

  Fields and their defaults: DEFAULTS (only `dataset` is required). The probe's fields have their own defaults,
  as big_vision's few-shot evaluator: neither `variables_shardings` (jit takes the variables as placed) nor the
  run's `defaults` are used. `run` yields, with name = the `name` field, `a/<name>_<k>shot`: the mean accuracy
  over seeds for every k in shots, then `z/<name>_<k>shot_seed<s>`: each seed's (big_vision's `a/` and `z/`
  prefixes sort headline numbers first and details last in TensorBoard). All processes must call it; all get
  the same metrics.
  """

  def __init__(self, predict_fn: PredictFn, mesh, *, variables_shardings=None, defaults=None, **cfg):
    del variables_shardings, defaults
    self.cfg = cfg = resolve_config(cfg)
    sharding.check_batch_size(cfg['batch_size'], mesh, name='few-shot batch_size')
    self.mesh = mesh
    self.streams = [data.eval_iter(cfg['dataset'], split, pp=cfg['pp'], global_batch_size=cfg['batch_size'],
                                   data_dir=cfg['data_dir'], cache=cfg['cache'])
                    for split in (cfg['train_split'], cfg['test_split'])]
    self.step = make_step(predict_fn, mesh, cfg['representation_layer'])

  def run(self, variables):
    cfg, t0 = self.cfg, time.time()
    splits = []
    for stream in self.streams:
      x, y = extract(self.step, variables, stream, self.mesh)
      if len(x) != stream.num_examples:  # the stream's padding contract, checked where it matters
        raise RuntimeError(f'{cfg["dataset"]} {stream.split!r}: extracted {len(x)} examples, expected '
                           f'{stream.num_examples}')
      splits += [x, y]
    t1 = time.time()
    accuracy = fewshot_accuracy(*splits, shots=cfg['shots'], seeds=cfg['seeds'], l2_reg=cfg['l2_reg'])
    name = cfg['name']
    means = {f'a/{name}_{k}shot': float(np.mean(per_seed)) for k, per_seed in accuracy.items()}
    logging.info('few-shot %s: %s (features of %d + %d examples, dim %d, in %.1fs; probes in %.1fs)', name,
                 ', '.join(f'{k}-shot {means[f"a/{name}_{k}shot"]:.4f}' for k in accuracy), len(splits[0]),
                 len(splits[2]), splits[0].shape[1], t1 - t0, time.time() - t1)
    yield from means.items()
    for k, per_seed in accuracy.items():
      yield from ((f'z/{name}_{k}shot_seed{s}', a) for s, a in enumerate(per_seed))

  @staticmethod
  def summary(metrics: dict) -> str:
    return ', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k.startswith('a/'))
