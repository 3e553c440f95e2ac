"""RandAugment (Cubuk et al., 2020) on uint8 RGB images with TensorFlow ops alone and stateless randomness.

A port of the TF-TPU `autoaugment.distort_image_with_randaugment` that big_vision's `randaug(N, M)` wraps
(that code needs the defunct tensorflow_addons for its affine transforms; here they are
`tf.raw_ops.ImageProjectiveTransformV3`, nearest-neighbour, filled with grey 128 as the reference's
wrap/unwrap trick does). Each of the `num_layers` layers picks one of the 16 ops uniformly and always applies
it at the fixed magnitude M (`cutout_const=40`, `translate_const=100`, fill 128, as the reference):

| op           | argument at magnitude M (reference max level 10)   | M = 15 (Mixer i1k)  | M = 9         |
|--------------|----------------------------------------------------|---------------------|---------------|
| AutoContrast | -                                                  |                     |               |
| Equalize     | -                                                  |                     |               |
| Invert       | -                                                  |                     |               |
| Rotate       | +-30 * M/10 degrees (random sign)                  | +-45 deg            | +-27 deg      |
| Posterize    | keep int(4 * M/10) bits                            | 6 bits              | 3 bits        |
| Solarize     | invert pixels >= int(256 * M/10)                   | 384: no-op          | 230           |
| Color        | blend factor 1.8 * M/10 + 0.1 (1: identity)        | 2.8                 | 1.72          |
| Contrast     | same factor                                        | 2.8                 | 1.72          |
| Brightness   | same factor                                        | 2.8                 | 1.72          |
| Sharpness    | same factor                                        | 2.8                 | 1.72          |
| ShearX/Y     | +-0.3 * M/10 (random sign)                         | +-0.45              | +-0.27        |
| TranslateX/Y | +-100 * M/10 pixels (random sign)                  | +-150 px            | +-90 px       |
| Cutout       | grey square of side <= 2 * int(40 * M/10), random centre | side <= 120   | side <= 72    |
| SolarizeAdd  | add int(110 * M/10) to pixels < 128, saturating    | +165                | +99           |

The reference's quirks are kept so magnitudes mean what they mean in Google's recipes (Solarize weakens as M
grows; Posterize keeps more bits as M grows), and so is its Contrast bug: it blends towards a constant grey of
(pixel count / 256) (the sum of its 256-bin histogram, divided by 256; 196 at 224x224, whatever the image),
not the mean grey level. The Mixer recipe reproduces big_vision's runs, which trained with that Contrast.
timm's RandAugment (`rand-m9-mstd0.5-inc1`, ConvMixer and DaViT: 15 PIL ops without Cutout, each applied with
probability 0.5 at a noisy magnitude, "increasing" ops, a Contrast towards the mean grey) is `randaug_timm.py`
and the `randaug_timm` pp op.

This module owns the image transforms; the `randaug` pp op in `ops.py` wraps `distort_image_with_randaugment`.
"""
import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128  # grey: the reference's replace value for geometric ops and Cutout
CUTOUT_CONST = 40
TRANSLATE_CONST = 100


def blend(degenerate, image, factor):
  """degenerate + factor * (image - degenerate), saturated to uint8; factor 1 is the identity."""
  x = tf.cast(degenerate, tf.float32) + factor * (tf.cast(image, tf.float32) - tf.cast(degenerate, tf.float32))
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _random_sign(value, seed):
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -value, value)


def _transform(image, matrix):
  """Projective transform; `matrix` (8 floats) maps output (x, y) to input coordinates; outside is FILL."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=float(FILL), interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


def autocontrast(image):
  """Stretches each channel to [0, 255]; constant channels stay."""
  x = tf.cast(image, tf.float32)
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.cast(tf.where(hi > lo, tf.clip_by_value((x - lo) * scale, 0.0, 255.0), x), tf.uint8)


def _equalize_channel(channel):
  """PIL's histogram equalisation of one uint8 channel."""
  x = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(x, minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))  # count of the brightest level present
  step = (tf.reduce_sum(hist) - last) // 255

  def equalize():
    lut = tf.concat([[0], (tf.cumsum(hist) + step // 2)[:-1] // step], 0)
    return tf.gather(tf.clip_by_value(lut, 0, 255), x)
  return tf.cast(tf.cond(step > 0, equalize, lambda: x), tf.uint8)


def equalize(image):
  return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=-1)


def invert(image):
  return 255 - image


def rotate(image, degrees):
  """Counter-clockwise rotation about the image centre."""
  angle = degrees * math.pi / 180.0
  h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32) - 1.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  x0 = (w - (cos * w - sin * h)) / 2.0
  y0 = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, tf.stack([cos, -sin, x0, sin, cos, y0, 0.0, 0.0]))


def posterize(image, bits):
  """Keeps the `bits` (int or int32 tensor) high bits of each value; bits <= 0 keeps none, bits >= 8 all."""
  shift = 8 - tf.clip_by_value(bits, 0, 8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift), tf.uint8)


def solarize(image, threshold):
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def color(image, factor):
  return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def contrast(image, factor):
  """The reference's Contrast: blends towards the grey level uint8(min(pixel count / 256, 255)) (its bug, kept)."""
  pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
  grey = tf.cast(tf.minimum(pixels / 256.0, 255.0), tf.uint8)
  return blend(tf.fill(tf.shape(image), grey), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blends with a 3x3 smoothed copy (PIL's SMOOTH kernel) whose one-pixel border is the original (so images
  under 3 pixels high or wide blend with themselves, as in PIL)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding='SAME')[0]
  smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows, cols = tf.range(h), tf.range(w)
  inner = ((rows > 0) & (rows < h - 1))[:, None, None] & ((cols > 0) & (cols < w - 1))[None, :, None]
  return blend(tf.where(inner, smooth, image), image, factor)


def shear_x(image, level):
  return _transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, level):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]))


def cutout(image, pad_size, seed):
  """Fills [c - pad_size, c + pad_size) around a uniformly random centre c with grey."""
  shape = tf.shape(image)
  cy = tf.random.stateless_uniform([], seed, 0, shape[0], tf.int32)
  cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0, shape[1], tf.int32)
  rows, cols = tf.range(shape[0]), tf.range(shape[1])
  inside = (((rows >= cy - pad_size) & (rows < cy + pad_size))[:, None]
            & ((cols >= cx - pad_size) & (cols < cx + pad_size))[None, :])
  return tf.where(inside[:, :, None], tf.constant(FILL, tf.uint8), image)


def _enhance(m):
  return m / MAX_LEVEL * 1.8 + 0.1


# name -> f(image, magnitude, seed): the reference's `available_ops`, in its order, with its level_to_arg.
OPS = (
    ('AutoContrast', lambda im, m, s: autocontrast(im)),
    ('Equalize', lambda im, m, s: equalize(im)),
    ('Invert', lambda im, m, s: invert(im)),
    ('Rotate', lambda im, m, s: rotate(im, _random_sign(m / MAX_LEVEL * 30.0, s))),
    ('Posterize', lambda im, m, s: posterize(im, int(m / MAX_LEVEL * 4))),
    ('Solarize', lambda im, m, s: solarize(im, int(m / MAX_LEVEL * 256))),
    ('Color', lambda im, m, s: color(im, _enhance(m))),
    ('Contrast', lambda im, m, s: contrast(im, _enhance(m))),
    ('Brightness', lambda im, m, s: brightness(im, _enhance(m))),
    ('Sharpness', lambda im, m, s: sharpness(im, _enhance(m))),
    ('ShearX', lambda im, m, s: shear_x(im, _random_sign(m / MAX_LEVEL * 0.3, s))),
    ('ShearY', lambda im, m, s: shear_y(im, _random_sign(m / MAX_LEVEL * 0.3, s))),
    ('TranslateX', lambda im, m, s: translate_x(im, _random_sign(m / MAX_LEVEL * TRANSLATE_CONST, s))),
    ('TranslateY', lambda im, m, s: translate_y(im, _random_sign(m / MAX_LEVEL * TRANSLATE_CONST, s))),
    ('Cutout', lambda im, m, s: cutout(im, int(m / MAX_LEVEL * CUTOUT_CONST), s)),
    ('SolarizeAdd', lambda im, m, s: solarize_add(im, int(m / MAX_LEVEL * 110))),
)


def apply_op(image, index, magnitude: float, seed):
  """Applies OPS[index] (a scalar int32 tensor) to a uint8 (H, W, 3) image."""
  branches = [lambda f=f: f(image, magnitude, seed) for _, f in OPS]
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def distort_image_with_randaugment(image, num_layers: int, magnitude: float, seed):
  """`num_layers` ops, each chosen uniformly from OPS and applied at `magnitude`; `seed` is a stateless seed."""
  def layer(i, image):
    choose, op_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, i), 2))
    index = tf.random.stateless_uniform([], choose, 0, len(OPS), tf.int32)
    return i + 1, apply_op(image, index, magnitude, op_seed)

  # A loop rather than a Python for: the 16 branches are traced once, whatever num_layers is.
  return tf.while_loop(lambda i, _: i < num_layers, layer, (tf.constant(0), image))[1]
