"""Pre-processing ops, the pp parser, RandAugment, eval.py's per-family presets and the recipes' strings
(mixer_jax.data.ops/randaug/presets, configs/*_i1k.py)."""
import contextlib
import importlib

import numpy as np
import pytest
import tensorflow as tf

from mixer_jax.bench import synthetic_image
from mixer_jax.data import ops, presets, randaug

SEED = tf.constant([3, 7], tf.int64)


def photo(h=61, w=83, seed=0) -> np.ndarray:
  return synthetic_image(h, w, np.random.default_rng(seed))


@contextlib.contextmanager
def global_tf_seed(seed):
  tf.random.set_seed(seed)
  try:
    yield
  finally:
    tf.random.set_seed(None)


def run(pp: str, image, seed=SEED, **features):
  """Applies a pp string to one example and returns it as numpy."""
  out = ops.parse(pp)({'image': tf.constant(image), ops.SEED_KEY: seed, **features})
  return {k: v.numpy() for k, v in out.items() if k != ops.SEED_KEY}


# ------------------------------------------------------------------------------------------------ parser


def test_parse_splits_on_top_level_bars_and_binds_literals():
  p = ops.parse('decode | resize((24, 32), method="bicubic")|onehot(10, key="a|b")|keep("image", "labels")')
  assert [op.name for op in p.ops] == ['decode', 'resize', 'onehot', 'keep']
  assert str(p) == 'decode|resize((24, 32), method="bicubic")|onehot(10, key="a|b")|keep("image", "labels")'
  assert ops.parse('').ops == ()


@pytest.mark.parametrize('pp, words', [
    ('decode|resise(224)', ["'resise'", 'known ops']),
    ('decode|resize()', ["'resize'", 'size']),
    ('resize(224, colour=1)', ["'resize'", 'colour']),
    ('resize(-3)', ["'resize'", 'positive']),
    ('resize(224, method="cubic")', ["'resize'", 'bicubic']),
    ('inception_crop(224, area_min=50, area_max=10)', ["'inception_crop'", 'area_min']),
    ('randaug(2, 50)', ["'randaug'", 'magnitude']),
    ('onehot(10, on=0.9, label_smoothing=0.1)', ["'onehot'", 'not both']),
    ('value_range(in_min=1, in_max=1)', ["'value_range'", 'in_max']),
    ('keep()', ["'keep'", 'key']),
    ('resize(size=x)', ['literals']),
    ('decode()()', ['name(args)']),
])
def test_bad_ops_fail_at_parse_time_naming_the_op(pp, words):
  with pytest.raises(ValueError) as e:
    ops.parse(pp)
  assert all(w in str(e.value) for w in words), str(e.value)
  assert '\n' not in str(e.value)


def test_random_ops_are_marked_and_split_off_for_caching():
  p = ops.parse('decode|resize_small(40)|random_crop(32)|flip_lr|value_range')
  assert [op.random for op in p.ops] == [False, False, True, True, False]
  prefix, rest = p.split_deterministic()
  assert [op.name for op in prefix.ops] == ['decode', 'resize_small']
  assert [op.name for op in rest.ops] == ['random_crop', 'flip_lr', 'value_range']


def test_random_op_without_seed_says_what_is_missing():
  with pytest.raises(ValueError, match="'flip_lr' is random and needs a per-example '_seed'"):
    ops.parse('flip_lr')({'image': tf.zeros([4, 4, 3], tf.uint8)})


# ------------------------------------------------------------------------------------------------ image ops


def test_decode_jpeg_png_and_grayscale():
  img = photo()
  np.testing.assert_array_equal(run('decode', tf.io.encode_png(img))['image'], img)
  out = run('decode', tf.io.encode_jpeg(img, quality=95))['image']
  assert out.shape == img.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - img).mean() < 12  # lossy (chroma subsampling of a noisy image)
  gray = tf.io.encode_png(img[:, :, :1])
  assert run('decode', gray)['image'].shape == (61, 83, 3)
  assert run('decode(channels=1)', gray)['image'].shape == (61, 83, 1)
  assert run('decode(precise=True)', tf.io.encode_jpeg(img))['image'].shape == img.shape
  assert run('decode(channels=1)|grayscale_to_rgb', gray)['image'].shape == (61, 83, 3)
  assert np.array_equal(run('grayscale_to_rgb', img)['image'], img)


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_decode_jpeg_and_inception_crop(fmt):
  img = photo(120, 90)
  encoded = tf.io.encode_jpeg(img) if fmt == 'jpeg' else tf.io.encode_png(img)
  out = run('decode_jpeg_and_inception_crop(32)', encoded)['image']
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, run('decode_jpeg_and_inception_crop(32)', encoded)['image'])  # same seed
  other = run('decode_jpeg_and_inception_crop(32)', encoded, seed=tf.constant([1, 2], tf.int64))['image']
  assert not np.array_equal(out, other)
  # Without a size the crop itself comes back: its area is within the range (percent of the image).
  for s in range(8):
    crop = run('decode_jpeg_and_inception_crop(area_min=20, area_max=40)', encoded,
               seed=tf.constant([s, 0], tf.int64))['image']
    assert 0.19 <= crop.shape[0] * crop.shape[1] / (120 * 90) <= 0.41


def test_inception_crop_area_and_ratio():
  img = photo(100, 100)
  for s in range(8):
    crop = run('inception_crop(area_min=50, area_max=60, ratio_min=1.0, ratio_max=2.0)', img,
               seed=tf.constant([s, 1], tf.int64))['image']
    h, w = crop.shape[:2]
    assert 0.49 <= h * w / 1e4 <= 0.61 and 0.9 <= w / h <= 2.1
  out = run('inception_crop(48, method="bicubic")', img)['image']
  assert out.shape == (48, 48, 3) and out.dtype == np.uint8


def test_resize_ops_keep_dtype_and_aspect():
  img = photo(60, 90)
  assert run('resize(32)', img)['image'].shape == (32, 32, 3)
  assert run('resize((20, 40), method="bicubic", antialias=True)', img)['image'].dtype == np.uint8
  assert run('resize_small(30)', img)['image'].shape == (30, 45, 3)
  assert run('resize_small(30)', img.transpose(1, 0, 2))['image'].shape == (45, 30, 3)
  floats = run('value_range(0, 1)|resize(16, method="lanczos3")', img)['image']
  assert floats.dtype == np.float32 and floats.shape == (16, 16, 3)


def test_crops_flip_and_pad():
  img = photo(40, 50)
  np.testing.assert_array_equal(run('central_crop(20)', img)['image'], img[10:30, 15:35])
  np.testing.assert_array_equal(run('central_crop((40, 10))', img)['image'], img[:, 20:30])
  crop = run('random_crop(17)', img)['image']
  assert crop.shape == (17, 17, 3)
  assert any(np.array_equal(crop, img[i:i + 17, j:j + 17]) for i in range(24) for j in range(34))
  flips = {bool(np.array_equal(run('flip_lr', img, seed=tf.constant([s, 0], tf.int64))['image'], img[:, ::-1]))
           for s in range(8)}
  assert flips == {True, False}
  padded = run('pad(2)', photo(28, 28))['image']
  assert padded.shape == (32, 32, 3) and padded[0].max() == 0 and padded[2:30, 2:30].max() > 0
  reflect = run('pad((1, 3), mode="reflect")', img)['image']
  assert reflect.shape == (42, 56, 3) and np.array_equal(reflect[0, 3:-3], img[1])


def test_value_range_and_normalize():
  img = photo()
  out = run('value_range(-1, 1)', img)['image']
  assert out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
  np.testing.assert_allclose(out, img / 127.5 - 1, atol=1e-6)
  const = np.full((4, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(run('normalize', const)['image'][0, 0], (1 - np.array(ops.IMAGENET_MEAN)) /
                             np.array(ops.IMAGENET_STD), rtol=1e-6)
  np.testing.assert_allclose(run('normalize(mean=0.5, std=0.5)', img)['image'], img / 127.5 - 1, atol=1e-6)
  clipped = run('value_range(0, 1, in_min=100, in_max=200, clip_values=True)', img)['image']
  assert clipped.min() == 0 and clipped.max() == 1


# ------------------------------------------------------------------------------------------------ labels


def test_onehot_smoothing_multihot_and_keep():
  label = tf.constant(2, tf.int64)
  out = run('onehot(4)', photo(), label=label)
  np.testing.assert_array_equal(out['labels'], [0, 0, 1, 0])
  smooth = run('onehot(4, label_smoothing=0.2)', photo(), label=label)['labels']
  np.testing.assert_allclose(smooth, [0.05, 0.05, 0.85, 0.05], rtol=1e-6)
  assert smooth.sum() == pytest.approx(1)
  multi = run('onehot(5, key="real_label", key_result="y")', photo(), real_label=tf.constant([0, 3], tf.int64))
  np.testing.assert_array_equal(multi['y'], [1, 0, 0, 1, 0])
  empty = run('onehot(5, key="real_label")', photo(), real_label=tf.zeros([0], tf.int64))
  np.testing.assert_array_equal(empty['labels'], np.zeros(5))
  kept = run('onehot(4)|keep("image", "labels")', photo(), label=label, file_name=tf.constant('x'))
  assert sorted(kept) == ['image', 'labels']
  with pytest.raises(KeyError, match='nope'):
    run('keep("image", "nope")', photo())


# ------------------------------------------------------------------------------------------------ RandAugment


def test_randaug_table_is_the_reference_list():
  assert [name for name, _ in randaug.OPS] == [
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness',
      'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd']


@pytest.mark.parametrize('h, w', [(37, 53), (64, 31)])
def test_every_randaug_op_on_odd_sizes(h, w):
  img = photo(h, w)
  outs = {}
  for i, (name, _) in enumerate(randaug.OPS):
    out = randaug.apply_op(tf.constant(img), tf.constant(i), 15.0, SEED).numpy()
    assert out.shape == img.shape and out.dtype == np.uint8, name
    outs[name] = out
  np.testing.assert_array_equal(outs['Invert'], 255 - img)
  assert np.all(outs['Posterize'] % 4 == 0)  # M=15 keeps 6 bits
  np.testing.assert_array_equal(outs['Solarize'], img)  # M=15: threshold 384, the reference's no-op
  assert (outs['AutoContrast'].min((0, 1)) == 0).all() and (outs['AutoContrast'].max((0, 1)) == 255).all()
  bright = img.astype(np.float32) * np.float32(2.8)  # factor 1.8 * 15/10 + 0.1, blended in float32
  np.testing.assert_array_equal(outs['Brightness'], np.clip(bright, 0, 255).astype(np.uint8))
  assert (outs['SolarizeAdd'][img < 128] >= img[img < 128]).all() and (outs['SolarizeAdd'][img >= 128] ==
                                                                      img[img >= 128]).all()
  for name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout'):
    assert (outs[name] == 128).all(-1).sum() > 0, name  # grey fill where the image moved out / was cut
  for name in ('Color', 'Contrast', 'Sharpness'):
    assert not np.array_equal(outs[name], img), name


def test_equalize_spreads_a_narrow_histogram_monotonically():
  narrow = (100 + photo(40, 30) // 8).astype(np.uint8)  # values in [100, 131]
  out = randaug.equalize(tf.constant(narrow)).numpy()
  for c in range(3):
    order = np.argsort(narrow[..., c], axis=None, kind='stable')
    assert (np.diff(out[..., c].ravel()[order].astype(int)) >= 0).all()  # a monotone lookup table
    assert out[..., c].min() < 20 and out[..., c].max() > 230


def test_randaug_identities_at_neutral_magnitudes():
  img = tf.constant(photo(33, 47))
  assert np.array_equal(randaug.rotate(img, 0.0), img)
  assert np.array_equal(randaug.translate_x(img, 0.0), img)
  for enhance in (randaug.color, randaug.contrast, randaug.brightness, randaug.sharpness):
    assert np.array_equal(enhance(img, 1.0), img)
  np.testing.assert_array_equal(randaug.translate_y(img, 5.0)[:-5], img[5:])
  gray = randaug.contrast(img, 0.0).numpy()
  assert (gray == 33 * 47 // 256).all()  # the reference's (pixel count / 256) grey, not the mean grey level


def test_randaug_op_is_stateless_and_runs_on_odd_sizes():
  img = photo(45, 71)
  a = run('randaug(2, 15)', img)['image']
  np.testing.assert_array_equal(a, run('randaug(2, 15)', img)['image'])
  with global_tf_seed(1234):  # TF's global random state must play no part
    np.testing.assert_array_equal(a, run('randaug(2, 15)', img)['image'])
  outs = [run('randaug(3, 9)', img, seed=tf.constant([s, 5], tf.int64))['image'] for s in range(6)]
  assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) > 1
  np.testing.assert_array_equal(run('randaug(0, 15)', img)['image'], img)
  with pytest.raises(ValueError, match='uint8'):
    run('value_range|randaug(2, 15)', img)


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize('family', presets.FAMILIES)
def test_presets_and_recipe_strings_parse_and_give_model_inputs(family):
  """eval.py's per-family eval pp, and the pre-training pp each family's recipe writes (configs/<family>_i1k.py)."""
  img = tf.io.encode_jpeg(photo(300, 400))
  label = tf.constant(7, tf.int64)
  ev = run(presets.eval_pp(family, num_classes=10), img, label=label)
  tr = run(importlib.import_module(f'configs.{family}_i1k').get_config().input.pp, img, label=label)
  assert sorted(ev) == sorted(tr) == ['image', 'labels']
  assert ev['image'].shape == tr['image'].shape == (224, 224, 3)
  assert ev['image'].dtype == tr['image'].dtype == np.float32
  assert ev['labels'].argmax() == tr['labels'].argmax() == 7
  if family == 'mixer':
    assert -1 <= ev['image'].min() and ev['image'].max() <= 1
    assert ev['labels'].max() == 1
  else:
    assert tr['labels'].max() == pytest.approx(0.9001)  # smoothing 0.1 over 1000 classes
    assert -2.2 < ev['image'].min() < 0 < ev['image'].max() < 2.7  # ImageNet mean/std
  assert 'resize_small(256)' in presets.eval_pp('mixer')
  assert 'resize_small(233, method="bicubic"' in presets.eval_pp('convmixer')
  assert 'resize_small(248, method="bicubic"' in presets.eval_pp('davit')
  assert 'key="real_label"' in presets.eval_pp(family, label_key='real_label')
  with pytest.raises(ValueError, match='resnet'):
    presets.eval_pp('resnet')
