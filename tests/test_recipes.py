"""Every recipe config builds and trains 2 steps (with its evaluations) on mock data with a tiny model."""
import contextlib
import importlib

import numpy as np
import pytest
import jax
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_data
from mixer_jax import models, trainer

TINY = {  # architecture overrides, keeping each recipe's model family
    'mixer': dict(patch_size=32, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32),
    'convmixer': dict(dim=16, depth=1, kernel_size=3, patch_size=28),
    'davit': dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}


def _image_folder(root, classes=3, per_class=4):
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for c in range(classes):
      folder = root / split / f'n{c:08d}'
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
        (folder / f'{i}.jpg').write_bytes(tf.io.encode_jpeg(pixels).numpy())
  return root


@pytest.mark.parametrize('recipe,arg', [
    ('mixer_i1k', ''), ('mixer_i21k', 'data={folder},num_classes=3'), ('convmixer_i1k', 'variant=768_32'),
    ('davit_i1k', 'variant=small'), ('finetune', 'model=mixer_b16,dataset=cifar10,res=32'),
    # (oxford_iiit_pet's mock data has invalid bounding boxes; flowers use the same small-dataset preset)
    ('finetune', 'model=convmixer_768_32,dataset=oxford_flowers102,res=56'), ('quickstart', 'model=davit'),
])
def test_recipe_runs_two_steps(recipe, arg, tmp_path, monkeypatch):
  config = importlib.import_module(f'configs.{recipe}').get_config(
      arg.format(folder=_image_folder(tmp_path / 'folder')) or None)
  config.model.update(TINY[models.family(config.model.name)])
  config.input.batch_size = 8
  if config.model.get('bn_group_size'):  # ConvMixer's per-GPU statistics: groups of 4 of the 8
    config.model.bn_group_size = 4
  if config.mixup.group_size:  # timm's per-GPU mixup: groups of 4 of the 8
    config.mixup.group_size = 4
  config.input.data_dir = str(tmp_path / 'tfds')
  config.input.shuffle_buffer = 16
  config.input.cache = None
  config.total_epochs = config.total_examples = None
  config.total_steps = 2
  config.eval_every_epochs = config.eval_every_steps = None
  config.schedule.warmup_epochs = None
  config.schedule.warmup_steps = 0 if config.schedule.type == 'onecycle' else 1
  for cfg in config.evals.values():
    cfg.batch_size = 8
  if recipe == 'quickstart':  # the local Fashion-MNIST builder prepares from IDX files: small ones
    monkeypatch.setenv('FASHION_MNIST_IDX_DIR', fake_data.fashion_mnist_like(str(tmp_path / 'idx'), train=24,
                                                                              test=12))
    mock = contextlib.nullcontext()
  else:
    mock = tfds.testing.mock_data(num_examples=12)
  with mock:
    # one device: sharding has its own tests, and partitioning 8 ways doubles DaViT's compile time
    metrics = trainer.train_and_evaluate(config, str(tmp_path / 'workdir'), devices=jax.devices()[:1])
  assert metrics['step'] == 2 and np.isfinite(metrics['train/loss'])
  for name in config.evals:
    assert metrics[f'{name}/count'] > 0 and 0 <= metrics[f'{name}/top1'] <= 1
