"""eval.py end to end, and the classification evaluator's ImageNet-ReaL semantics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax import convert, data, evaluators, models, sharding
from mixer_jax.evaluators import classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = dict(patch_size=8, hidden_dim=16, num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=16)


def _image_folder(root, per_class):
  """3 classes told apart by colour, `per_class[split]` images each, sizes varying."""
  rng = np.random.default_rng(0)
  for split, n in per_class.items():
    for c in range(3):
      folder = root / split / f'class{c}'
      folder.mkdir(parents=True)
      for i in range(n):
        pixels = rng.integers(0, 60, (30 + i, 40, 3), dtype=np.uint8)
        pixels[..., c] += 180
        (folder / f'{i}.png').write_bytes(tf.io.encode_png(pixels).numpy())
  return root


def _eval_py(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
  return subprocess.run([sys.executable, 'eval.py', *args], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_eval_py_accuracy_equals_a_direct_computation(tmp_path):
  root = _image_folder(tmp_path / 'photos', {'train': 6, 'test': 7})  # 21 test images: not a batch multiple
  model = models.create('mixer_s16', num_classes=3, image_size=32, **OPTIONS)
  variables = models.init_variables(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(x.shape).astype(np.float32), variables)
  convert.save(variables, str(tmp_path / 'model.npz'), 'mixer_s16', 'npz')
  dataset = f'imagefolder:{root}'
  run = _eval_py(f'--checkpoint={tmp_path / "model.npz"}', '--model=mixer_s16',
                 # scanned blocks: the per-block file is stacked for the model, which computes what the plain one does
                 '--model_options=scan_blocks=true,image_size=32,' + ','.join(f'{k}={v}' for k, v in OPTIONS.items()),
                 f'--dataset={dataset}',
                 '--split=test', '--batch_size=8', '--fewshot=' + dataset, '--fewshot_shots=1,5',
                 f'--output={tmp_path / "r.json"}')
  assert run.returncode == 0, run.stderr
  results = json.load(open(tmp_path / 'r.json'))
  fewshot, (results,) = results['fewshot'], results['evals'].values()

  # The same images through the same pre-processing, evaluated directly with numpy.
  stream = data.eval_iter(dataset, 'test', pp=results['pp'], global_batch_size=8, process_index=0, process_count=1)
  logits, labels = [], []
  for batch in stream:
    keep = batch['mask']
    logits.append(np.asarray(model.apply(variables, batch['image'][keep])[0]))
    labels.append(batch['labels'][keep].argmax(-1))
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  assert results['count'] == 21
  assert results['top1'] == pytest.approx(float((logits.argmax(-1) == labels).mean()), abs=1e-9)
  assert len(set(logits.argmax(-1))) > 1  # the random model's predictions vary: agreeing on top-1 means something
  assert set(fewshot) >= {f'a/photos_{k}shot' for k in (1, 5)}


@pytest.mark.slow
def test_eval_py_errors_are_one_line(tmp_path):
  run = _eval_py(f'--checkpoint={tmp_path / "missing.npz"}', '--model=mixer_b16')
  assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "missing.npz"}: no such checkpoint file or directory')


def test_real_labels_drop_unlabelled_images():
  """ImageNet-ReaL: images with an empty label set leave the denominator; one correct label is enough."""
  sets = [[3], [], [1, 3], [], [0], [2, 4], [4], []]
  images = np.zeros((len(sets), 8, 8, 3), np.uint8)

  def as_dataset(self, split, **kwargs):  # known cardinality, as prepared tfds data have
    return tf.data.Dataset.from_tensor_slices(
        {'image': images, 'real_label': tf.ragged.constant(sets, dtype=tf.int64), 'file_name': [b'x'] * len(sets)})

  # a "model" whose prediction for example i is class 3 for the first half and 4 for the rest
  predictions = np.array([3, 3, 3, 3, 4, 4, 4, 4])
  mesh = sharding.make_mesh((-1, 1, 1))
  predict_fn = lambda v, x: (jax.nn.one_hot(v[x[:, 0, 0, 0].astype(int)], 5), {})
  pp = 'value_range(0, 255)|onehot(5, key="real_label", key_result="labels")|keep("image", "labels")'
  images[:, 0, 0, 0] = np.arange(len(sets))  # each image carries its index, so the "model" can look it up
  with tfds.testing.mock_data(num_examples=len(sets), as_dataset_fn=as_dataset):
    evaluator = classification.Evaluator(
        predict_fn, mesh, variables_shardings=sharding.replicated(mesh), split='validation', pp=pp,
        defaults=dict(dataset='imagenet2012_real', data_dir=None, batch_size=8, loss='softmax_xent'))
    result = dict(evaluator.run(jax.device_put(predictions, sharding.replicated(mesh))))
  labelled = [s for s in sets if s]
  assert result['count'] == len(labelled) == 5
  correct = sum(p in s for p, s in zip(predictions, sets) if s)  # [3] yes, [1,3] yes, [0] no, [2,4] yes, [4] yes
  assert result['top1'] == pytest.approx(correct / 5) and correct == 4


def test_a_run_s_classification_entries_share_one_compiled_step(tmp_path):
  """ImageNet's val, v2 and ReaL differ only in their data: their evaluators run one jitted step, compiled once
  (before, each entry compiled its own)."""
  root = _image_folder(tmp_path / 'photos', {'train': 2, 'test': 3})
  model = models.create('mixer_s16', num_classes=3, image_size=32, **OPTIONS)
  mesh = sharding.make_mesh((-1, 1, 1))
  variables = jax.device_put(models.init_variables(model, jax.random.key(0)), sharding.replicated(mesh))
  predict_fn = lambda v, x: model.apply(v, x, train=False)
  pp = 'decode|resize(32)|value_range(-1, 1)|onehot(3)|keep("image", "labels")'
  evals = evaluators.from_config(
      {'train': dict(split='train', pp=pp), 'test': dict(split='test', pp=pp)}, predict_fn, mesh,
      variables_shardings=jax.tree.map(lambda _: sharding.replicated(mesh), variables),
      defaults=dict(dataset=f'imagefolder:{root}', data_dir=None, batch_size=8, loss='softmax_xent'))
  counts = {name: dict(evaluator.run(variables))['count'] for name, evaluator in evals.items()}
  assert counts == {'train': 6, 'test': 9}
  assert evals['train'].step is evals['test'].step and evals['train'].step._cache_size() == 1
