"""Recipes are data: loading one imports no framework, its pre-processing strings are the ones it had, the
tables configs/common.py keeps instead of importing are those of their owners, and every recipe builds and trains 2
steps (with its evaluations) on mock data with a tiny model."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from mixer_jax import models, trainer
from mixer_jax.data import ops, presets, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py') and f not in (
    '__init__.py', 'common.py'))
REQUIRED_ARGS = {'mixer_i21k': 'data=/data/imagenet21k'}  # an argument get_config cannot do without

TINY = {  # architecture overrides, keeping each recipe's model family
    'mixer': dict(patch_size=32, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32),
    'convmixer': dict(dim=16, depth=1, kernel_size=3, patch_size=28),
    'davit': dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}


def _get_config(recipe, arg=''):
  return importlib.import_module(f'configs.{recipe}').get_config(arg or REQUIRED_ARGS.get(recipe))


def test_loading_any_recipe_imports_no_framework():
  """Every recipe, and fine-tuning on an image folder (its classes are counted when the run starts, not here)."""
  recipes = [(r, REQUIRED_ARGS.get(r)) for r in RECIPES] + [('finetune', 'dataset=imagefolder:/nonexistent')]
  code = ('import sys, importlib\n'
          f'for recipe, arg in {recipes!r}:\n'
          '  importlib.import_module(f"configs.{recipe}").get_config(arg)\n'
          'heavy = ("tensorflow", "jax", "flax", "mixer_jax.models", "mixer_jax.convert")\n'
          'print(sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")}))')
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == '[]', f'loading the recipes imported {run.stdout.strip()}'


def test_an_image_folder_s_classes_are_counted_when_the_run_starts(tmp_path):
  """Classes are the class folders of all splits holding images (sources.ImageFolderSource); the recipe's pp strings
  follow the count, and an explicit --config.num_classes."""
  for split, classes in (('train', 'abc'), ('test', 'abcd')):
    for c in classes:
      (tmp_path / split / c).mkdir(parents=True)
      (tmp_path / split / c / '0.png').write_bytes(b'')  # listed by name only
  (tmp_path / 'train' / 'empty').mkdir()
  config = _get_config('finetune', f'model=mixer_s32,dataset=imagefolder:{tmp_path}')
  assert config.num_classes is None
  trainer.count_classes(config)
  assert config.num_classes == 4
  assert [config.input.pp.count('onehot(4, '), config.evals.test.pp.count('onehot(4, ')] == [1, 1]
  config.num_classes = 7
  assert 'onehot(7, ' in config.input.pp and 'onehot(7, ' in config.evals.test.pp


def test_model_switches_are_the_registry_s():
  for name in models.names():
    family = models.family(name)
    assert common.family(name) == family
    switches = {'remat': 'none'}  # every family: the options and their off/auto values models.create takes
    if models.variant(name).module in models.SCANNED_BLOCKS:
      switches['scan_blocks'] = False
    if 'depthwise' in models.options(name):
      switches['depthwise'] = 'auto'
    if 'attention_impl' in models.options(name):
      switches['attention_impl'] = None  # the model's automatic choice
    assert common.MODEL_SWITCHES[family] == switches, family
    assert set(switches) <= set(models.options(name))
    assert common.model_config(name, dtype='bfloat16') == dict(name=name, **switches, dtype='bfloat16')
  assert set(common.MODEL_SWITCHES) == {models.family(n) for n in models.names()}
  assert common.model_config('resnet50') == dict(name='resnet50')  # left to the config check to name


def test_image_folder_prefix_is_the_data_s():
  assert common.IMAGE_FOLDER == sources.IMAGEFOLDER_PREFIX


# Every recipe's pp strings as mixer_jax/data/presets.py and the recipes built them before the strings moved into
# the recipes (issue 16), verbatim: (recipe, arg) -> {'input' or eval name: pp}.
_MIXER_EVAL = ('decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|'
               'onehot(1000, key="label", key_result="labels")|keep("image", "labels")')
_CONVMIXER_EVAL = ('decode|resize_small(233, method="bicubic", antialias=True)|central_crop(224)|'
                   'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
                   'onehot(1000, key="label", key_result="labels")|keep("image", "labels")')
_DAVIT_EVAL = ('decode|resize_small(248, method="bicubic", antialias=True)|central_crop(224)|'
               'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
               'onehot(1000, key="label", key_result="labels")|keep("image", "labels")')
_FLOWERS_EVAL = ('decode|resize(384)|normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
                 'onehot(102, key="label", key_result="labels")|keep("image", "labels")')
_CIFAR10_EVAL = ('decode|resize(224)|value_range(-1, 1)|onehot(10, key="label", key_result="labels")|'
                 'keep("image", "labels")')
_QUICKSTART = 'decode(channels=1)|value_range(-1, 1)|onehot(10)|keep("image", "labels")'
PP_BEFORE = {
    ('mixer_i1k', ''): dict(
        input='decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)|'
              'onehot(1000, key="label", key_result="labels")|keep("image", "labels")',
        minival=_MIXER_EVAL, val=_MIXER_EVAL, v2=_MIXER_EVAL,
        real='decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|'
             'onehot(1000, key="real_label", key_result="labels")|keep("image", "labels")'),
    ('mixer_i21k', 'data=/data/i21k,variant=l16,num_classes=3'): dict(
        input='decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 20)|value_range(-1, 1)|'
              'onehot(3, key="label", key_result="labels")|keep("image", "labels")',
        minival='decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|'
                'onehot(3, key="label", key_result="labels")|keep("image", "labels")'),
    ('convmixer_i1k', ''): dict(
        input='decode_jpeg_and_random_resized_crop(224, method="random")|flip_lr|'
              'randaug_timm("rand-m9-mstd0.5-inc1", interpolation="random")|'
              'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
              'onehot(1000, key="label", key_result="labels", label_smoothing=0.1)|keep("image", "labels")',
        val=_CONVMIXER_EVAL, v2=_CONVMIXER_EVAL,
        real='decode|resize_small(233, method="bicubic", antialias=True)|central_crop(224)|'
             'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
             'onehot(1000, key="real_label", key_result="labels")|keep("image", "labels")'),
    ('davit_i1k', ''): dict(
        input='decode_jpeg_and_random_resized_crop(224, method="bicubic")|flip_lr|'
              'randaug_timm("rand-m9-mstd0.5-inc1", interpolation="bicubic")|'
              'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
              'onehot(1000, key="label", key_result="labels", label_smoothing=0.1)|keep("image", "labels")',
        val=_DAVIT_EVAL, v2=_DAVIT_EVAL,
        real='decode|resize_small(248, method="bicubic", antialias=True)|central_crop(224)|'
             'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
             'onehot(1000, key="real_label", key_result="labels")|keep("image", "labels")'),
    ('finetune', ''): dict(
        input='decode|inception_crop(224)|flip_lr|value_range(-1, 1)|'
              'onehot(10, key="label", key_result="labels")|keep("image", "labels")',
        minival=_CIFAR10_EVAL, test=_CIFAR10_EVAL),
    ('finetune', 'model=convmixer_768_32,dataset=oxford_flowers102,res=384'): dict(
        input='decode|inception_crop(384)|flip_lr|normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|'
              'onehot(102, key="label", key_result="labels")|keep("image", "labels")',
        minival=_FLOWERS_EVAL, test=_FLOWERS_EVAL),
    ('quickstart', ''): dict(input=_QUICKSTART, test=_QUICKSTART),
}
# The two spellings that changed, each to the one spelling of its kind: ops.normalize's defaults are ImageNet's
# mean/std, and common.labels writes onehot's defaults out.
RESPELLED = (('normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))', 'normalize'),
             ('onehot(10)|', 'onehot(10, key="label", key_result="labels")|'))


@pytest.mark.parametrize('recipe,arg', list(PP_BEFORE))
def test_recipe_pp_strings_are_the_ones_they_were(recipe, arg):
  config = _get_config(recipe, arg)
  expected = dict(PP_BEFORE[recipe, arg])
  for before, now in RESPELLED:
    expected = {k: v.replace(before, now) for k, v in expected.items()}
  assert {'input': config.input.pp, **{name: cfg.pp for name, cfg in config.evals.items()}} == expected


def test_respelled_pp_strings_pre_process_alike():
  before = ('decode|resize(32)|normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))|onehot(10)|'
            'keep("image", "labels")')
  after = before
  for old, new in RESPELLED:
    after = after.replace(old, new)
  assert after == 'decode|resize(32)|normalize|onehot(10, key="label", key_result="labels")|keep("image", "labels")'
  image = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
  old, new = (ops.parse(pp)({'image': image, 'label': tf.constant(3, tf.int64)}) for pp in (before, after))
  for key in ('image', 'labels'):
    np.testing.assert_array_equal(old[key].numpy(), new[key].numpy())


@pytest.mark.parametrize('family', presets.FAMILIES)
def test_eval_py_presets_are_the_recipes_eval_strings(family):
  evals = _get_config(f'{family}_i1k').evals
  assert evals.val.pp == presets.eval_pp(family)
  assert evals.real.pp == presets.eval_pp(family, label_key='real_label')


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


@pytest.mark.slow
@pytest.mark.parametrize('recipe,arg', [
    ('mixer_i1k', ''), ('mixer_i21k', 'data={folder},num_classes=3'), ('convmixer_i1k', 'variant=768_32'),
    ('davit_i1k', 'variant=small'), ('finetune', 'model=mixer_b16,dataset=cifar10,res=32'),
    # (oxford_iiit_pet's mock data has invalid bounding boxes; flowers use the same small-dataset preset)
    ('finetune', 'model=convmixer_768_32,dataset=oxford_flowers102,res=56'),
])  # the quickstart's: tests/test_docs.py runs the README's commands, tests/test_workdirs.py each family
def test_recipe_runs_two_steps(recipe, arg, tmp_path):
  config = _get_config(recipe, arg.format(folder=_image_folder(tmp_path / 'folder')))
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
  with tfds.testing.mock_data(num_examples=12):
    # one device: sharding has its own tests, and partitioning 8 ways doubles DaViT's compile time
    metrics = trainer.train_and_evaluate(config, str(tmp_path / 'workdir'), devices=jax.devices()[:1])
  assert metrics['step'] == 2 and np.isfinite(metrics['train/loss'])
  for name in config.evals:
    assert metrics[f'{name}/count'] > 0 and 0 <= metrics[f'{name}/top1'] <= 1
