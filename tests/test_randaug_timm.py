"""timm's RandAugment (mixer_jax.data.randaug_timm, pp op `randaug_timm`) against timm's own PIL ops and parser;
big_vision's Contrast (mixer_jax.data.randaug) against the TF-TPU formula."""
import random
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from torch_reference import timm  # timm imported after torchvision's op schemas are registered (CPU-only torch)

from mixer_jax.bench import synthetic_image
from mixer_jax.data import ops, randaug, randaug_timm

auto_augment = timm.data.auto_augment
FILL = (124, 116, 104)
SEED = tf.constant([3, 7], tf.int64)
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
SIGNED = GEOMETRIC + ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing')


def photo(h, w, seed=0):
  return synthetic_image(h, w, np.random.default_rng(seed))


# Two photos (odd and even sizes; they span 0..255) and a dim, low-contrast one, where AutoContrast, Equalize
# and Contrast have work to do.
IMAGES = (photo(37, 53), photo(64, 64, seed=1), (photo(31, 30, seed=2) // 3 + 50).astype(np.uint8))


def timm_op(name, image, magnitude, negate=False, bicubic=False):
  """timm's AugmentOp(name) at a fixed magnitude, applied for sure, its random sign forced through random.random."""
  resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
  hparams = {'img_mean': FILL, 'interpolation': resample}
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  if name.startswith('Posterize') and auto_augment.LEVEL_TO_ARG[name](magnitude, {}) == (0,):
    return np.zeros_like(image)  # 0 bits: black in the Pillow of the original runs; today's Pillow raises
  with mock.patch.object(random, 'random', lambda: 0.9 if negate else 0.1):  # timm negates when random() > 0.5
    return np.asarray(op(Image.fromarray(image)))


def ours(name, image, magnitude, negate=False, bicubic=False):
  return randaug_timm.NAME_TO_OP[name](tf.constant(image), tf.constant(magnitude, tf.float64), tf.constant(negate),
                                       tf.constant(bicubic), FILL).numpy()


# ------------------------------------------------------------------------------------------------ ops vs timm


def test_op_tables_are_timms():
  assert randaug_timm._RAND_INCREASING_TRANSFORMS == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
  assert randaug_timm._RAND_TRANSFORMS == tuple(auto_augment._RAND_TRANSFORMS)
  assert len(randaug_timm._RAND_INCREASING_TRANSFORMS) == 15 and 'Cutout' not in randaug_timm.NAME_TO_OP


@pytest.mark.parametrize('name', sorted(set(randaug_timm._RAND_INCREASING_TRANSFORMS) - set(GEOMETRIC))
                         + ['Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness'])
def test_pixel_op_equals_timm(name):
  """Exact: the same integer/float32 arithmetic as PIL, at the magnitudes where arguments change."""
  for image in IMAGES:
    for magnitude in ((0.0, 2.6, 4.5, 7.5, 9.0, 10.0) if auto_augment.LEVEL_TO_ARG[name] else (9.0,)):
      for negate in ((False, True) if name in SIGNED else (False,)):
        np.testing.assert_array_equal(ours(name, image, magnitude, negate), timm_op(name, image, magnitude, negate),
                                      err_msg=f'{name} m={magnitude} negate={negate} {image.shape}')


@pytest.mark.parametrize('name', GEOMETRIC)
def test_geometric_op_equals_timm(name):
  """Exact, fill pixels included: PIL's coordinates, inside test, clamped taps, float64 bilinear / bicubic (a=-1)
  and truncation are reproduced, so no tolerance is needed."""
  for image in IMAGES:
    for magnitude, negate, bicubic in ((0.0, False, True), (4.5, True, False), (4.5, False, True), (9.0, False, False),
                                       (9.0, True, True), (10.0, True, False), (6.83, False, True)):
      out, ref = ours(name, image, magnitude, negate, bicubic), timm_op(name, image, magnitude, negate, bicubic)
      np.testing.assert_array_equal(out, ref, err_msg=f'{name} m={magnitude} negate={negate} bicubic={bicubic}')
      if magnitude >= 4.5:
        assert (ref == FILL).all(-1).any(), 'fill pixels must be exercised'


def test_rotate_equals_pil_at_many_angles_inside_tf_data():
  """The rotation centre is where rounding order shows: PIL's matrix, summed in PIL's order, in a tf.data graph."""
  image = IMAGES[0]
  angles = np.concatenate([np.arange(-30.0, 30.01, 1.25), np.random.default_rng(0).uniform(-30, 30, 40)])
  bicubic = np.arange(len(angles)) % 2 == 0
  got = tf.data.Dataset.from_tensor_slices((angles, bicubic)).map(
      lambda a, c: randaug_timm.rotate(tf.constant(image), a, c, FILL)).batch(len(angles)).get_single_element()
  for out, angle, cubic in zip(got.numpy(), angles, bicubic):
    resample = Image.Resampling.BICUBIC if cubic else Image.Resampling.BILINEAR
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).rotate(angle, resample, fillcolor=FILL)),
                                  err_msg=f'angle {angle}')


def test_pixel_ops_on_edge_case_histograms_equal_pil():
  """Equalize's lookup table overflowing to 256 at the top level, a constant channel, a two-level channel."""
  overflow = np.concatenate([np.repeat(np.arange(255), 2), [100, 255, 255, 255]]).astype(np.uint8)  # 514 pixels
  two_levels = np.where(np.arange(514) % 3 == 0, 40, 41).astype(np.uint8)
  image = np.stack([overflow, np.full(514, 77, np.uint8), two_levels], -1).reshape(2, 257, 3)
  for name in ('AutoContrast', 'Equalize', 'ContrastIncreasing', 'ColorIncreasing', 'SharpnessIncreasing'):
    for magnitude in (0.0, 9.0):
      np.testing.assert_array_equal(ours(name, image, magnitude), timm_op(name, image, magnitude), err_msg=name)


def test_posterize_zero_bits_is_black_as_in_the_original_runs():
  """PosterizeIncreasing at m=10 keeps 4 - int(4) = 0 bits: the Pillow of 2021-22 (mask ~(2**8 - 1)) gave black;
  today's Pillow refuses bits=0, which timm's op passes straight through."""
  image = IMAGES[0]
  np.testing.assert_array_equal(ours('PosterizeIncreasing', image, 10.0), np.zeros_like(image))
  with pytest.raises(ValueError, match='bits'):
    auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(Image.fromarray(image))


# ------------------------------------------------------------------------------------------------ the draws


def draws(config_str, interpolation='random', n=2000):
  """_draw for n seeds, batched in one tf.data graph."""
  config = randaug_timm.parse_config(config_str)
  seeds = tf.random.experimental.stateless_split(tf.constant([1, 2], tf.int64), n)
  batch = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: randaug_timm._draw(s, config, interpolation)).batch(n).get_single_element()
  return randaug_timm.Draws(*[x.numpy() for x in batch])


def within(count, n, p, sigmas=5):
  """count is a Binomial(n, p) draw within `sigmas` standard deviations of its mean (a flake: < 1e-6)."""
  return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_draw_statistics_of_rand_m9_mstd05_inc1():
  d = draws('rand-m9-mstd0.5-inc1')
  n = len(d.index)
  applied = d.applied.sum(1)  # ops applied per image: Binomial(2, 0.5)
  for k, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
    assert within((applied == k).sum(), n, p), (k, np.bincount(applied))
  counts = np.bincount(d.index.ravel(), minlength=16)
  assert counts[15] == 0 and all(within(c, 2 * n, 1 / 15) for c in counts[:15]), counts
  assert within((d.index[:, 0] == d.index[:, 1]).sum(), n, 1 / 15)  # with replacement: the same op twice, 1/15
  m = d.magnitude.ravel()
  # N(9, 0.5) clipped to [0, 10]: P(m = 10) = P(z > 2) = 0.02275; P(m < 8.5) = P(z < -1) = 0.15866.
  assert m.min() > 6 and m.max() == 10.0
  assert within((m == 10.0).sum(), 2 * n, 0.02275) and within((m < 8.5).sum(), 2 * n, 0.15866)
  assert abs(m.mean() - 8.99576) < 5 * 0.5 / np.sqrt(2 * n)  # E[min(X, 10)] = 9 - 0.5 (phi(2) - 2 (1 - Phi(2)))
  assert within(d.negate.sum(), 2 * n, 0.5) and within(d.bicubic.sum(), 2 * n, 0.5)


def test_draw_options():
  fixed = draws('rand-m7-n3-mstd0-p1', interpolation='bicubic', n=50)
  assert fixed.index.shape == (50, 3) and (fixed.magnitude == 7.0).all() and fixed.applied.all()
  assert fixed.bicubic.all() and not draws('rand-m7', interpolation='bilinear', n=50).bicubic.any()
  uniform = draws('rand-m9-mstd101', n=2000).magnitude.ravel()  # timm: mstd > 100 samples uniform(0, m)
  assert uniform.min() >= 0 and uniform.max() < 9 and abs(uniform.mean() - 4.5) < 5 * 9 / np.sqrt(12 * 4000)
  assert within((uniform < 3).sum(), 4000, 1 / 3)
  high = draws('rand-m12-mmax15-mstd1', n=500).magnitude
  assert high.max() > 13 and high.max() <= 15  # mmax lifts the clip above 10
  assert not draws('rand-p0', n=50).applied.any() and draws('rand-inc0', n=200).index.max() == 14


# ------------------------------------------------------------------------------------------------ parser and pp op


@pytest.mark.parametrize('config_str', ['rand-m9-mstd0.5-inc1', 'rand-m9-n3-mstd0.5', 'rand', 'rand-m15-mmax15-p1',
                                        'rand-mstd101-m5-inc0', 'rand-n0-p0.25'])
def test_parser_agrees_with_timm(config_str):
  ref = auto_augment.rand_augment_transform(config_str, {'img_mean': FILL})
  config = randaug_timm.parse_config(config_str)
  assert config.num_layers == ref.num_layers
  assert config.transforms == tuple(op.name for op in ref.ops)
  for op in ref.ops:
    assert (config.magnitude, config.prob, config.magnitude_std) == (op.magnitude, op.prob, op.magnitude_std)
    assert config.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize('config_str, words', [
    ('rand-m9-w0', ["'w0'", 'not one of']),  # timm: an AssertionError
    ('rand-m9-tweights', ["'tweights'", 'not implemented']),  # timm: weighted choice, not implemented here
    ('rand-m9-inc', ["'inc'"]),  # timm silently ignores a section without digits
    ('rand-m9.5', ["'m9.5'", 'int']),
    ('rand-p1.5', ["'p1.5'", '[0, 1]']),
    ('rand-inc2', ["'inc2'", '0 or 1']),
    ('rand-mmax0', ["'mmax0'", 'positive']),
    ('rand-m9-m5', ["'m'", 'twice']),
    ('augmix-m5', ['rand-m9-mstd0.5-inc1']),
    ('rand--m9', ["''"]),
])
def test_parser_refuses_with_one_line(config_str, words):
  with pytest.raises(ValueError) as e:
    ops.parse(f'randaug_timm("{config_str}")')
  message = str(e.value)
  assert "'randaug_timm'" in message and '\n' not in message
  assert all(w in message for w in words), message


@pytest.mark.parametrize('pp, words', [
    ('randaug_timm(interpolation="nearest")', ['interpolation', 'bicubic']),
    ('randaug_timm(fill=(1, 2))', ['fill', 'triple']),
    ('randaug_timm(fill=(256, 0, 0))', ['fill', '255']),
    ('randaug_timm(config_str=9)', ['config_str']),
])
def test_pp_op_refuses_bad_arguments(pp, words):
  with pytest.raises(ValueError) as e:
    ops.parse(pp)
  assert "'randaug_timm'" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_pp_op_in_tf_data_is_timm_with_its_own_draws_and_a_pure_function_of_the_seed():
  """On odd, dynamic sizes: the op's output equals timm's ops chained by hand with the draws `_draw` makes from
  the op's seed (so `_draw` is what the op uses), and is the same whatever TF's global random state."""
  config_str = 'rand-m9-mstd0.5-inc1-n3'
  config, pp = randaug_timm.parse_config(config_str), ops.parse(f'randaug_timm("{config_str}")')
  images = (photo(45, 71, seed=3), photo(23, 38, seed=4))
  seeds = [np.array([s, 11], np.int64) for s in range(12)]
  spec = {'image': tf.TensorSpec([None, None, 3], tf.uint8), ops.SEED_KEY: tf.TensorSpec([2], tf.int64)}
  examples = lambda: ({'image': images[i % 2], ops.SEED_KEY: s} for i, s in enumerate(seeds))
  dataset = tf.data.Dataset.from_generator(examples, output_signature=spec).map(pp)  # traced once, run twice
  outs = [x['image'].numpy() for x in dataset]
  tf.random.set_seed(1234)
  try:
    again = [x['image'].numpy() for x in dataset]
  finally:
    tf.random.set_seed(None)
  used = set()
  for i, (seed, out) in enumerate(zip(seeds, outs)):
    np.testing.assert_array_equal(out, again[i])
    d = randaug_timm._draw(ops._next_seed({ops.SEED_KEY: tf.constant(seed)}, 'randaug_timm')[0], config, 'random')
    expected = images[i % 2]
    for layer in np.flatnonzero(d.applied.numpy()):
      name = config.transforms[int(d.index[layer])]
      used.add(name)
      expected = timm_op(name, expected, float(d.magnitude[layer]), bool(d.negate[layer]), bool(d.bicubic[layer]))
    np.testing.assert_array_equal(out, expected, err_msg=f'seed {seed}')
  assert len(used) >= 8 and used & set(GEOMETRIC), used
  assert len({o.tobytes() for o in outs[0::2]}) > 3  # different seeds, different augmentations


def test_pp_op_needs_uint8_rgb():
  with pytest.raises(ValueError, match='uint8'):
    ops.parse('value_range|randaug_timm')({'image': tf.constant(IMAGES[0]), ops.SEED_KEY: SEED})


# ------------------------------------------------------------------------------------------------ big_vision's Contrast


def tpu_contrast(image, factor):
  """TF-TPU autoaugment's contrast and blend (big_vision's RandAugment), verbatim in TF 2."""
  degenerate = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
  hist = tf.histogram_fixed_width(degenerate, [0, 255], nbins=256)
  mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
  degenerate = tf.clip_by_value(tf.ones_like(degenerate, dtype=tf.float32) * mean, 0.0, 255.0)
  degenerate = tf.image.grayscale_to_rgb(tf.cast(degenerate, tf.uint8))
  if factor == 0.0:
    return degenerate
  if factor == 1.0:
    return image
  temp = tf.cast(degenerate, tf.float32) + factor * (tf.cast(image, tf.float32) - tf.cast(degenerate, tf.float32))
  if 0.0 < factor < 1.0:
    return tf.cast(temp, tf.uint8)
  return tf.cast(tf.clip_by_value(temp, 0.0, 255.0), tf.uint8)


@pytest.mark.parametrize('h, w', [(37, 53), (224, 224), (300, 301)])  # grey 7, 196 and 255 (clipped from 353)
def test_big_vision_contrast_is_the_tpu_formula(h, w):
  image = tf.constant(photo(h, w))
  for factor in (0.0, 0.3, 1.0, 1.72, 2.8):
    np.testing.assert_array_equal(randaug.contrast(image, factor), tpu_contrast(image, factor), err_msg=str(factor))
  grey = randaug.contrast(image, 0.0).numpy()
  assert (grey == min(h * w // 256, 255)).all()
  assert abs(float(tf.reduce_mean(tf.image.rgb_to_grayscale(image)[..., 0])) - grey[0, 0, 0]) > 5  # not the mean
