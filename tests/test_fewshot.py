"""The few-shot linear probe: its math against direct solves, shot selection, and a tiny model end to end."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mixer_jax import data, models, sharding
from mixer_jax.evaluators import fewshot

COLORS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))  # class k's images are noisy versions of COLORS[k]
NUM_TRAIN, NUM_TEST = 7, 5  # per class: 21 and 15 examples, neither a multiple of the batch of 8
PP = 'decode|value_range(-1, 1)|keep("image", "label")'


def clusters(rng, num_classes: int, per_class: int, dim: int, centers: np.ndarray):
  labels = np.repeat(np.arange(num_classes), per_class)
  return centers[labels] + rng.normal(size=(len(labels), dim)), labels


# --- Math -------------------------------------------------------------------------------------------------

def test_separable_clusters_are_learned_from_five_shots():
  rng = np.random.default_rng(0)
  centers = 8.0 * rng.normal(size=(4, 16))
  train_x, train_y = clusters(rng, 4, 30, 16, centers)
  test_x, test_y = clusters(rng, 4, 50, 16, centers)
  acc = fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=(1, 5, 10, 25), seeds=3, l2_reg=2**10)
  assert sorted(acc) == [1, 5, 10, 25] and all(len(per_seed) == 3 for per_seed in acc.values())
  for k in (5, 10, 25):
    assert acc[k] == [1.0, 1.0, 1.0], (k, acc[k])
  assert np.mean(acc[1]) > 0.9, acc[1]


def test_random_labels_stay_at_chance():
  rng = np.random.default_rng(1)
  train_x, test_x = rng.normal(size=(200, 16)), rng.normal(size=(800, 16))
  train_y, test_y = rng.integers(0, 4, 200), rng.integers(0, 4, 800)
  acc = fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, shots=(1, 5, 25), seeds=3, l2_reg=2**10)
  for k, per_seed in acc.items():
    assert abs(np.mean(per_seed) - 0.25) < 0.1, (k, per_seed)


@pytest.mark.parametrize('n, d', [(40, 10), (10, 40)])  # eigh(XᵀX) and eigh(XXᵀ)
def test_ridge_regression_matches_a_direct_solve(n, d):
  rng = np.random.default_rng(n)
  x, x_test = fewshot.design_matrices(3.0 + 2.0 * rng.normal(size=(n, d)), rng.normal(size=(5, d)))
  assert x.shape == (n, d + 1) and x_test.shape == (5, d + 1)
  np.testing.assert_allclose(x[:, :d].mean(axis=0), 0.0, atol=1e-12)
  np.testing.assert_allclose(x[:, :d].std(axis=0), 1.0, atol=1e-4)  # std + 1e-5
  np.testing.assert_array_equal(x[:, d], 100.0)
  y = np.where(rng.integers(0, 3, n)[:, None] == np.arange(3), 1.0, -1.0)
  direct = np.linalg.solve(x.T @ x + 2**10 * np.eye(d + 1), x.T @ y)
  np.testing.assert_allclose(fewshot.ridge_regression(x, y, 2**10), direct, rtol=1e-8, atol=1e-10)


def test_shot_selection():
  labels = np.repeat(np.arange(5), 12)[np.random.default_rng(0).permutation(60)]
  picks = {seed: fewshot.select_shots(labels, 4, seed=seed) for seed in range(3)}
  for idx in picks.values():
    assert len(set(idx)) == 20
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [4] * 5)
  assert len({tuple(idx) for idx in picks.values()}) == 3  # different seeds, different sets
  np.testing.assert_array_equal(fewshot.select_shots(labels, 4, seed=1), picks[1])  # same seed, same set
  ten = fewshot.select_shots(labels, 10, seed=1)  # one seed's shot sets are nested
  assert set(picks[1]) <= set(ten)


def test_bad_inputs_are_one_line_errors():
  x, y = np.zeros((6, 3)), np.array([0, 0, 0, 1, 1, 2])
  with pytest.raises(ValueError, match=r'class 2 has 1 training examples, fewer than the 2 shots'):
    fewshot.fewshot_accuracy(x, y, x, y, shots=(1, 2), seeds=1)
  with pytest.raises(ValueError, match=r'class 3 has 0 training examples'):
    fewshot.fewshot_accuracy(x, y, x, y, shots=(1,), seeds=1, num_classes=4)
  with pytest.raises(ValueError, match='dimensions'):
    fewshot.fewshot_accuracy(x, y, x[:, :2], y, shots=(1,))
  with pytest.raises(ValueError, match='shots must be positive'):
    fewshot.fewshot_accuracy(x, y, x, y, shots=(0,))
  with pytest.raises(ValueError, match='integers'):
    fewshot.fewshot_accuracy(x, y.astype(float), x, y, shots=(1,))
  with pytest.raises(ValueError, match='unknown few-shot config field'):
    fewshot.resolve_config(dict(dataset='cifar100', shot=5))
  with pytest.raises(ValueError, match='needs a dataset'):
    fewshot.resolve_config({})
  assert fewshot.resolve_config(dict(dataset='cars196:2.1.0'))['name'] == 'cars196'
  assert fewshot.resolve_config(dict(dataset='imagefolder:/data/flowers/'))['name'] == 'flowers'


# --- End to end: a tiny Mixer, an image folder, 8 devices -------------------------------------------------

@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp('colors'))
  rng = np.random.default_rng(0)
  for split, per_class in (('train', NUM_TRAIN), ('test', NUM_TEST)):
    for k, color in enumerate(COLORS):
      os.makedirs(os.path.join(root, split, f'c{k}'))
      for i in range(per_class):
        pixels = np.clip(np.array(color) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, f'c{k}', f'{i}.png'))
  return 'imagefolder:' + root


@pytest.fixture(scope='module')
def model_and_variables():
  model = models.create('mixer_s16', num_classes=3, image_size=16, patch_size=4, hidden_dim=16, num_blocks=1,
                        tokens_mlp_dim=8, channels_mlp_dim=16)
  return model, models.init_variables(model, jax.random.key(0))


def apply_fn_of(model):
  return lambda variables, images: model.apply(variables, images, train=False)


def test_extract_counts_every_example_once_and_matches_the_model(folder, model_and_variables):
  model, variables = model_and_variables
  mesh = sharding.make_mesh((-1, 1, 1))
  stream = data.eval_iter(folder, 'train', pp=PP, global_batch_size=8)
  assert stream.num_steps == 3  # 21 examples: the last batch holds 3 padding rows
  x, y = fewshot.extract(fewshot.make_step(apply_fn_of(model), mesh), variables, stream, mesh)
  assert x.shape == (3 * NUM_TRAIN, 16) and x.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(y), [NUM_TRAIN] * 3)
  batches = list(stream)
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  np.testing.assert_array_equal(y, np.concatenate([b['label'][b['mask']] for b in batches]))
  _, out = jax.jit(apply_fn_of(model))(variables, images)  # one device, no mesh: the reference
  np.testing.assert_allclose(x, np.asarray(out['pre_logits']), rtol=1e-5, atol=1e-5)


def test_a_run_s_probes_share_one_jitted_step(folder, model_and_variables):
  """Every few-shot entry of a run (the same predict_fn) gathers features through one jitted function."""
  model, _ = model_and_variables
  mesh, predict_fn = sharding.make_mesh((-1, 1, 1)), apply_fn_of(model)
  a, b = (fewshot.Evaluator(predict_fn, mesh, dataset=folder, pp=PP, batch_size=8, name=name) for name in 'ab')
  assert a.step is b.step
  assert fewshot.Evaluator(apply_fn_of(model), mesh, dataset=folder, pp=PP, batch_size=8).step is not a.step


def test_evaluate_end_to_end(folder, model_and_variables):
  model, variables = model_and_variables
  mesh = sharding.make_mesh((-1, 1, 1))
  cfg = dict(dataset=folder, pp=PP, batch_size=8, shots=(1, 5), seeds=2)
  metrics = dict(fewshot.Evaluator(apply_fn_of(model), mesh, **cfg).run(variables))
  name = os.path.basename(folder)
  assert set(metrics) == {f'a/{name}_1shot', f'a/{name}_5shot', *(f'z/{name}_{k}shot_seed{s}'
                                                                    for k in (1, 5) for s in (0, 1))}
  for k in (1, 5):  # means of per-seed accuracies, each a multiple of 1/15 (15 test images)
    per_seed = [metrics[f'z/{name}_{k}shot_seed{s}'] for s in (0, 1)]
    assert metrics[f'a/{name}_{k}shot'] == pytest.approx(np.mean(per_seed))
    np.testing.assert_allclose(np.array(per_seed) * 15, np.round(np.array(per_seed) * 15), atol=1e-9)
  # Colors pass through a random Mixer to linearly separable features: five shots suffice.
  assert metrics[f'a/{name}_5shot'] == 1.0, metrics
