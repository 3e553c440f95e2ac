"""timm's train-time crop (`random_resized_crop`, `decode_jpeg_and_random_resized_crop` in mixer_jax.data.ops)
against timm's RandomResizedCropAndInterpolation and PIL.

timm draws with Python's `random`. The tests patch `random.uniform`, `random.randint` and `random.choice` so that
timm consumes the uniforms our op draws from its stateless seed, mapped as `ops._rrc_box` documents:
uniform(a, b) = a + (b - a) * u, randint(0, n) = floor(u * (n + 1)), choice((bilinear, bicubic)) = bilinear iff
u < 0.5. The box must then be timm's exactly, the pixels within MAX_GAP / MAX_OFF of PIL's.
"""
import io
import math
import random

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from torch_reference import torch  # before timm: it makes torchvision importable on a CPU-only torch
from timm.data import transforms as timm_transforms

from mixer_jax.bench import synthetic_image
from mixer_jax.data import ops

IMAGE = synthetic_image(100, 150, np.random.default_rng(0))
PIL_FILTERS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
# Our resize against PIL's (ops._resize_pil): PIL's fixed-point weights round some values near .5 the other way, so
# pixels may differ by up to 2 levels, in at most this fraction of the pixels (the worst seen over ~300 photo-like
# size pairs, down- and upscaling: 5.7% bilinear, 0.2% bicubic; on average 0.4% and 0.01%).
MAX_GAP, MAX_OFF = 2, {'bilinear': 0.06, 'bicubic': 0.005}


def patch_timm_random(monkeypatch, u):
  """Feeds timm's next draws from `u`, laid out as `ops._rrc_sample` draws them; returns the randint calls made."""
  uniforms = iter(np.stack([u[:10], u[10:20]], 1).ravel())  # timm alternates area, log-ratio per try
  positions, randints = iter(u[20:22]), []

  def randint(a, b):
    assert a == 0
    randints.append(b)
    return math.floor(float(next(positions)) * (b + 1))

  def choice(seq):
    assert tuple(seq) == timm_transforms._RANDOM_INTERPOLATION  # (bilinear, bicubic)
    return seq[0] if u[22] < 0.5 else seq[1]

  monkeypatch.setattr(random, 'uniform', lambda a, b: a + (b - a) * float(next(uniforms)))
  monkeypatch.setattr(random, 'randint', randint)
  monkeypatch.setattr(random, 'choice', choice)
  return randints


def op_uniforms(seed):
  """The 23 uniforms random_resized_crop draws for an example whose `_seed` is `seed`."""
  op_seed, _ = ops._next_seed({ops.SEED_KEY: seed}, 'random_resized_crop')
  return tf.random.stateless_uniform([23], op_seed, dtype=tf.float64).numpy()


def resize_gap(ours, reference):
  """(max |diff|, fraction of pixels that differ) in uint8 levels."""
  diff = np.abs(ours.astype(int) - np.asarray(reference).astype(int))
  return diff.max(), (diff > 0).mean()


# ------------------------------------------------------------------------------------------------ the box


@tf.function
def our_boxes(heights, widths, u, scale, ratio):
  return tf.map_fn(lambda a: tf.stack(ops._rrc_box(a[0], a[1], a[2][:10], a[2][10:20], a[2][20], a[2][21],
                                                   scale, ratio)),
                   (heights, widths, u), fn_output_signature=tf.int32)


def shapes(rng, n, kind):
  if kind == 'any':
    return rng.integers(3, 600, n), rng.integers(3, 600, n)
  short, long = rng.integers(1, 12, n), rng.integers(300, 1000, n)  # every try fails for most
  tall = rng.random(n) < 0.5
  return np.where(tall, long, short), np.where(tall, short, long)


@pytest.mark.parametrize('scale, ratio, kind', [
    ((0.08, 1.0), (3 / 4, 4 / 3), 'any'),
    ((0.08, 1.0), (3 / 4, 4 / 3), 'extreme'),  # very wide or tall images: the centre-crop fallback
    ((0.9, 1.0), (2.5, 4.0), 'any'),  # mostly cannot fit: the fallback with the ratio clamped to the minimum
    ((0.9, 1.0), (0.2, 0.4), 'any'),  # ... and to the maximum
    ((0.3, 0.7), (0.5, 2.0), 'any'),
])
def test_box_is_timms_get_params(monkeypatch, scale, ratio, kind):
  rng = np.random.default_rng(0)
  n = 300
  heights, widths = shapes(rng, n, kind)
  u = rng.random((n, 23))
  ours = our_boxes(tf.constant(heights, tf.int32), tf.constant(widths, tf.int32), tf.constant(u), scale,
                   ratio).numpy()
  fallbacks = 0
  for k in range(n):
    randints = patch_timm_random(monkeypatch, u[k])
    timm = timm_transforms.RandomResizedCropAndInterpolation.get_params(
        torch.empty(1, int(heights[k]), int(widths[k])), scale, ratio)
    assert tuple(ours[k]) == timm, (heights[k], widths[k], u[k])
    fallbacks += not randints
  assert 0 < fallbacks < n if kind == 'any' else fallbacks > n // 2  # both branches are exercised


def test_sampler_statistics():
  """2,000 seeds on a 100x150 image: area and aspect in range, log-aspect uniform, each method about half."""
  def sample(seed):
    (top, left, h, w), bilinear = ops._rrc_sample(tf.shape(IMAGE), seed, (0.08, 1.0), (3 / 4, 4 / 3))
    return tf.stack([top, left, h, w, tf.cast(bilinear, tf.int32)])

  seeds = tf.stack([tf.range(2000, dtype=tf.int64), tf.fill([2000], tf.constant(5, tf.int64))], 1)
  draws = tf.function(lambda s: tf.map_fn(sample, s, fn_output_signature=tf.int32))(seeds)
  top, left, h, w, bilinear = draws.numpy().T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 150).all()
  area, log_aspect = h * w / 15000, np.log(w / h)
  # Rounding each side to a pixel moves the area by < 3% and log(w / h) by < 0.04 at these sizes.
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1
  assert np.abs(log_aspect).max() <= math.log(4 / 3) + 0.04
  # Below 45% of the area every try fits, so there the aspect is the drawn one: log-uniform over the range.
  small = log_aspect[area < 0.45]
  counts = np.histogram(small, bins=4, range=(-math.log(4 / 3), math.log(4 / 3)))[0]
  sigma = math.sqrt(len(small) * 0.25 * 0.75)
  assert len(small) > 500 and np.abs(counts - len(small) / 4).max() < 5 * sigma, counts
  assert abs(bilinear.mean() - 0.5) < 5 * math.sqrt(0.25 / 2000)


# ------------------------------------------------------------------------------------------------ the op


@pytest.mark.parametrize('size, method', [(32, 'random'), ((96, 160), 'random'), (32, 'bicubic')])
def test_op_in_dataset_map_equals_timm_transform(monkeypatch, size, method):
  """The op inside tf.data against timm's transform on a PIL image, fed the same uniforms (down- and upscaling)."""
  seeds = tf.stack([tf.range(12, dtype=tf.int64), tf.fill([12], tf.constant(9, tf.int64))], 1)
  pp = ops.parse(f'random_resized_crop({size!r}, method={method!r})')
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: pp({'image': tf.constant(IMAGE), ops.SEED_KEY: s}))
  transform = timm_transforms.RandomResizedCropAndInterpolation(size, interpolation=method)
  picked = set()
  for seed, out in zip(seeds, ds.as_numpy_iterator()):
    u = op_uniforms(seed)
    patch_timm_random(monkeypatch, u)
    gap, off = resize_gap(out['image'], transform(Image.fromarray(IMAGE)))
    used = method if method != 'random' else 'bilinear' if u[22] < 0.5 else 'bicubic'
    assert out['image'].shape == (*ops._size(size), 3) and gap <= MAX_GAP and off < MAX_OFF[used], (seed, gap, off)
    eager = pp({'image': tf.constant(IMAGE), ops.SEED_KEY: seed})['image'].numpy()
    np.testing.assert_array_equal(eager, out['image'])  # a pure function of the seed, in graph or eager mode
    picked.add(u[22] < 0.5)
  if method == 'random':
    assert picked == {True, False}  # both of timm's interpolations among these seeds


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('crop, size', [
    ((150, 100), (32, 32)),  # downscale, horizontal pass first
    ((197, 314), (82, 299)),  # the height shrinks far more: Pillow 13 runs the vertical pass first
    ((40, 30), (97, 131)),  # upscale
    ((60, 80), (224, 224)),
])
def test_resize_is_pils(method, crop, size):
  """PIL's Image.resize within MAX_GAP / MAX_OFF."""
  image = synthetic_image(*crop, np.random.default_rng(1))
  ours = ops._resize_pil(tf.constant(image), size, method).numpy()
  gap, off = resize_gap(ours, Image.fromarray(image).resize(size[::-1], PIL_FILTERS[method]))
  assert gap <= MAX_GAP and off < MAX_OFF[method], (gap, off)


def encode(image, fmt):
  buffer = io.BytesIO()
  subsampling = {'jpeg444': 0, 'jpeg420': 2}.get(fmt)
  Image.fromarray(image).save(buffer, 'PNG' if fmt == 'png' else 'JPEG', quality=90,
                              **({} if fmt == 'png' else {'subsampling': subsampling}))
  return buffer.getvalue()


@pytest.mark.parametrize('fmt', ['jpeg444', 'jpeg420', 'png'])
def test_decode_variant_equals_decoding_whole_then_cropping(fmt):
  data = encode(IMAGE, fmt)
  whole = ops.parse('decode(precise=True)')({'image': tf.constant(data)})['image'].numpy()
  np.testing.assert_array_equal(whole, np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))  # PIL's pixels
  gaps = []
  for k in range(8):
    seed = tf.constant([k, 4], tf.int64)
    example = {'image': tf.constant(data), ops.SEED_KEY: seed}
    ours = ops.parse('decode_jpeg_and_random_resized_crop(48)')(example)['image'].numpy()
    reference = ops.parse('decode(precise=True)|random_resized_crop(48)')(example)['image'].numpy()
    gaps.append(np.abs(ours.astype(int) - reference).mean())
  # 4:2:0 chroma: libjpeg upsamples the window's edge columns from inside the window (a few levels there).
  assert max(gaps) == 0 if fmt != 'jpeg420' else max(gaps) < 0.5, gaps


@pytest.mark.parametrize('pp, words', [
    ('random_resized_crop(0)', ['size']),
    ('random_resized_crop(224, scale=(0.5, 0.1))', ['scale']),
    ('random_resized_crop(224, scale=(0.08, 1.5))', ['scale']),
    ('random_resized_crop(224, scale=0.5)', ['scale', 'pair']),
    ('random_resized_crop(224, ratio=(0, 1))', ['ratio']),
    ('decode_jpeg_and_random_resized_crop(224, method="cubic")', ['method', 'random']),
])
def test_bad_arguments_fail_at_parse_time(pp, words):
  with pytest.raises(ValueError) as e:
    ops.parse(pp)
  message = str(e.value)
  assert '\n' not in message and pp.split('(')[0] in message and all(w in message for w in words), message
