"""timm's RandAugment (`rand_augment_transform`, e.g. `--aa rand-m9-mstd0.5-inc1`) with TensorFlow ops alone.

The ConvMixer and DaViT authors trained with timm's train.py, whose RandAugment differs from big_vision's
(`randaug.py`): n ops (default 2) drawn uniformly *with replacement*, each applied with probability p (default
0.5) at a magnitude drawn per call from N(m, mstd) clipped to [0, mmax] (mstd > 100: uniform(0, m)); no Cutout;
PIL's ops, translations relative to the image size, fill `fill` (timm: the ImageNet mean, (124, 116, 104)).
The `inc1` set has the "increasing" ops (stronger as m grows); `inc0` (timm's default) the plain ones:

| op (inc1 name / inc0 name)            | argument at magnitude m (timm's level functions)                      |
|---------------------------------------|-----------------------------------------------------------------------|
| AutoContrast, Equalize, Invert        | -                                                                     |
| Rotate                                | +-30 * m/10 degrees (random sign), PIL's centre (w/2, h/2)            |
| PosterizeIncreasing / Posterize       | keep 4 - int(4 * m/10) / int(4 * m/10) bits                           |
| SolarizeIncreasing / Solarize         | invert pixels >= 256 - min(256, int(256 * m/10)) / min(256, int(..))  |
| SolarizeAdd                           | add min(128, int(110 * m/10)) to pixels < 128, saturating             |
| Color/Contrast/Brightness/Sharpness   | inc: max(0.1, 1 +- 0.9 * m/10) (random sign) / 1.8 * m/10 + 0.1      |
| ShearX, ShearY                        | +-0.3 * m/10 (random sign)                                            |
| TranslateXRel, TranslateYRel          | +-0.45 * m/10 (random sign) of the image width / height, in pixels    |

Every op equals timm's PIL op on the same image and magnitude (tests/test_randaug_timm.py). PIL's rules,
found by experiment and reproduced here:
- Geometric ops are `Image.transform(AFFINE)` (rotate builds PIL's matrix, rounded to 15 decimals as PIL does):
  output pixel (x, y) samples the input at matrix @ (x + 0.5, y + 0.5); a sample outside [0, w) x [0, h) is
  `fill`; inside, neighbours are clamped to the edge, bilinear or bicubic with a = -1 (PIL's transform uses
  a = -1, not its resize's -0.5), rows interpolated first, in float64, and the result truncated to uint8.
  'random' interpolation picks bilinear or bicubic per op call, as timm does when train.py runs with it.
- Color and Contrast use PIL's integer "L" conversion (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; Contrast
  blends towards int(mean L + 0.5); blends (`Image.blend`) run in float32 with a float32 factor and truncate.
- AutoContrast is PIL's lookup table int(level * scale - lo * scale) in float64.

Sums and quotients are written so that Grappler (tf.function, tf.data) cannot reorder them (`_div`, `add_n`,
full coordinate grids): a reordered float64 sum moves exactly-aligned pixels, such as the rotation centre, by
one grey level. The tests check the equality eagerly and inside tf.data.

Choices where the sources are ambiguous:
- Posterize with 0 bits (PosterizeIncreasing at m = 10, timm's clip bound; Posterize below m = 2.5) gives
  black, as the Pillow of the ConvMixer/DaViT runs did; today's Pillow refuses bits = 0, so timm now raises there.
- The config string is parsed strictly: sections timm ignores (no digits) or that we do not implement
  (`t...` transform sets, weights) are errors, as are repeated sections, p outside [0, 1], inc other than 0/1
  and mmax0 (timm reads mmax0 as 10).
- An op applies when a uniform draw u < p (timm: u <= p; the same distribution).

This module owns the config parser, the random draws and the ops; the `randaug_timm` pp op in `ops.py` wraps
`rand_augment_transform`. It must not depend on TF's global random state: every draw is `tf.random.stateless_*`.
"""
import dataclasses
import functools
import math
import re
from typing import NamedTuple

import tensorflow as tf

from mixer_jax.data import randaug as randaug_lib

MAX_LEVEL = randaug_lib.MAX_LEVEL  # timm's _LEVEL_DENOM: magnitude 10 is the full-strength argument
FILL = (124, 116, 104)  # timm's img_mean: round(255 * ImageNet mean), what train.py passes
INTERPOLATIONS = ('bilinear', 'bicubic', 'random')


def _div(x, y):
  """x / y as written: inside tf.function Grappler rewrites x / constant as x * (1 / constant), which rounds
  differently (and so can move a PIL-exact result by one grey level); it leaves divide_no_nan alone."""
  return tf.math.divide_no_nan(x, tf.convert_to_tensor(y, x.dtype))  # y: a float or a float64 tensor


# ---------------------------------------------------------------------------------------------------------------
# Pixel ops, as PIL computes them.

def _grayscale(image):
  """PIL's RGB -> "L" conversion (integer, rounded), as int32 (H, W)."""
  x = tf.cast(image, tf.int32)
  return tf.bitwise.right_shift(x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16)


def _blend(degenerate, image, factor):
  """PIL's Image.blend: the factor is a C float, so it is rounded to float32 before randaug's float32 blend."""
  return randaug_lib.blend(degenerate, image, tf.cast(factor, tf.float32))


def auto_contrast(image):
  """PIL's ImageOps.autocontrast: per channel, the lookup table int(level * scale + offset) in float64."""
  x = tf.cast(image, tf.int32)
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
  offset = tf.cast(-lo, tf.float64) * scale
  levels = tf.range(256)[:, None]
  lut = tf.clip_by_value(tf.cast(tf.cast(levels, tf.float64) * scale + offset, tf.int32), 0, 255)
  lut = tf.transpose(tf.where(hi > lo, lut, levels))  # (3, 256); a constant channel stays
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), x + 256 * tf.range(3)), tf.uint8)


def color(image, factor):
  gray = _grayscale(image)[..., None]
  return _blend(tf.cast(tf.tile(gray, [1, 1, 3]), tf.uint8), image, factor)


def contrast(image, factor):
  """PIL's ImageEnhance.Contrast: blends towards the constant int(mean "L" level + 0.5)."""
  gray = _grayscale(image)
  mean = _div(tf.reduce_sum(tf.cast(gray, tf.float64)), tf.cast(tf.size(gray), tf.float64))
  return _blend(tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.uint8)), image, factor)


def brightness(image, factor):
  return randaug_lib.brightness(image, tf.cast(factor, tf.float32))


def sharpness(image, factor):
  return randaug_lib.sharpness(image, tf.cast(factor, tf.float32))


# ---------------------------------------------------------------------------------------------------------------
# Geometric ops: PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor=fill).

def _lerp(a, b, d):
  return a + (b - a) * d


def _cubic(v1, v2, v3, v4, d):
  """PIL's transform bicubic (a = -1) through v1..v4 at d in [0, 1) past v2, in PIL's order of operations."""
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def affine(image, matrix, bicubic, fill):
  """Output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5, y' = y + 0.5.

  `matrix` is PIL's (a, b, c, d, e, f) as float64, `bicubic` a bool tensor (False: bilinear).
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  a, b, c, d, e, f = tf.unstack(matrix)
  # Full (H, W) grids, not broadcast rows and columns: Grappler reorders a chain of adds of different shapes
  # (and of constants), and a reordered sum moves exactly-aligned pixels (the rotation centre) by a grey level.
  xo, yo = tf.meshgrid(tf.cast(tf.range(w), tf.float64) + 0.5, tf.cast(tf.range(h), tf.float64) + 0.5)
  xin, yin = a * xo + b * yo + c, d * xo + e * yo + f
  inside = (xin >= 0) & (xin < tf.cast(w, tf.float64)) & (yin >= 0) & (yin < tf.cast(h, tf.float64))
  # Clamped coordinates keep the gathers in range where `inside` is False; those pixels become fill anyway.
  xs = tf.clip_by_value(xin, 0.0, tf.cast(w, tf.float64)) - 0.5
  ys = tf.clip_by_value(yin, 0.0, tf.cast(h, tf.float64)) - 0.5
  x0, y0 = tf.floor(xs), tf.floor(ys)
  dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  pixels = tf.reshape(tf.cast(image, tf.float64), [-1, 3])

  def tap(row, col):  # the input pixel (y0 + row, x0 + col), clamped to the image, as (H, W, 3)
    return tf.gather(pixels, tf.clip_by_value(y0 + row, 0, h - 1) * w + tf.clip_by_value(x0 + col, 0, w - 1))

  def bilinear_value():
    return _lerp(*[_lerp(tap(r, 0), tap(r, 1), dx) for r in (0, 1)], dy)

  def bicubic_value():
    return _cubic(*[_cubic(*[tap(r, k) for k in (-1, 0, 1, 2)], dx) for r in (-1, 0, 1, 2)], dy)

  value = tf.cond(bicubic, bicubic_value, bilinear_value)
  out = tf.cast(tf.clip_by_value(value, 0.0, 255.0), tf.uint8)
  return tf.where(inside[..., None], out, tf.constant(fill, tf.uint8))


def _round15(x):
  """Python's round(x, 15), which PIL applies to the rotation matrix's sines and cosines."""
  return _div(tf.round(x * 1e15), 1e15)


def rotate(image, degrees, bicubic, fill):
  """PIL's Image.rotate(degrees) (counter-clockwise about (w/2, h/2), same size)."""
  angle = -(tf.math.floormod(degrees, 360.0) * (math.pi / 180.0))
  cos, sin = _round15(tf.cos(angle)), _round15(tf.sin(angle))
  cx, cy = [tf.cast(n, tf.float64) / 2.0 for n in (tf.shape(image)[1], tf.shape(image)[0])]
  # PIL's (cos * -cx + sin * -cy) + cx; add_n keeps that order, where Grappler would add the constant cx first.
  c = tf.add_n([cos * -cx, sin * -cy, cx])
  f = tf.add_n([-sin * -cx, cos * -cy, cy])
  return affine(image, tf.stack([cos, sin, c, -sin, cos, f]), bicubic, fill)


def _shear_translate(sx=0.0, sy=0.0, tx=0.0, ty=0.0):
  """PIL's affine matrix (1, sx, tx, sy, 1, ty), float64."""
  return tf.stack([tf.cast(v, tf.float64) for v in (1.0, sx, tx, sy, 1.0, ty)])


def shear_x(image, factor, bicubic, fill):
  return affine(image, _shear_translate(sx=factor), bicubic, fill)


def shear_y(image, factor, bicubic, fill):
  return affine(image, _shear_translate(sy=factor), bicubic, fill)


def translate_x_rel(image, pct, bicubic, fill):
  return affine(image, _shear_translate(tx=pct * tf.cast(tf.shape(image)[1], tf.float64)), bicubic, fill)


def translate_y_rel(image, pct, bicubic, fill):
  return affine(image, _shear_translate(ty=pct * tf.cast(tf.shape(image)[0], tf.float64)), bicubic, fill)


# ---------------------------------------------------------------------------------------------------------------
# timm's level functions (magnitude m, float64, already clipped -> op argument), in timm's order of operations.

def _negate(value, negate):
  return tf.where(negate, -value, value)


def _int(x):
  return tf.cast(x, tf.int32)  # Python's int() of a non-negative float: truncation


def _level(m, scale):
  return _div(m, MAX_LEVEL) * scale  # timm's (level / _LEVEL_DENOM) * scale


def _posterize_level(m):
  return _int(_level(m, 4.0))


def _solarize_level(m):
  return tf.minimum(256, _int(_level(m, 256.0)))


def _enhance_level(m):
  return _level(m, 1.8) + 0.1


def _enhance_increasing_level(m, negate):
  return tf.maximum(1.0 + _negate(_level(m, 0.9), negate), 0.1)


# name -> f(image, magnitude, negate, bicubic, fill): timm's NAME_TO_OP with its LEVEL_TO_ARG applied.
NAME_TO_OP = {
    'AutoContrast': lambda im, m, neg, cubic, fill: auto_contrast(im),
    'Equalize': lambda im, m, neg, cubic, fill: randaug_lib.equalize(im),
    'Invert': lambda im, m, neg, cubic, fill: randaug_lib.invert(im),
    'Rotate': lambda im, m, neg, cubic, fill: rotate(im, _negate(_level(m, 30.0), neg), cubic, fill),
    'Posterize': lambda im, m, neg, cubic, fill: randaug_lib.posterize(im, _posterize_level(m)),
    'PosterizeIncreasing': lambda im, m, neg, cubic, fill: randaug_lib.posterize(im, 4 - _posterize_level(m)),
    'Solarize': lambda im, m, neg, cubic, fill: randaug_lib.solarize(im, _solarize_level(m)),
    'SolarizeIncreasing': lambda im, m, neg, cubic, fill: randaug_lib.solarize(im, 256 - _solarize_level(m)),
    'SolarizeAdd': lambda im, m, neg, cubic, fill: randaug_lib.solarize_add(
        im, tf.minimum(128, _int(_level(m, 110.0)))),
    'Color': lambda im, m, neg, cubic, fill: color(im, _enhance_level(m)),
    'ColorIncreasing': lambda im, m, neg, cubic, fill: color(im, _enhance_increasing_level(m, neg)),
    'Contrast': lambda im, m, neg, cubic, fill: contrast(im, _enhance_level(m)),
    'ContrastIncreasing': lambda im, m, neg, cubic, fill: contrast(im, _enhance_increasing_level(m, neg)),
    'Brightness': lambda im, m, neg, cubic, fill: brightness(im, _enhance_level(m)),
    'BrightnessIncreasing': lambda im, m, neg, cubic, fill: brightness(im, _enhance_increasing_level(m, neg)),
    'Sharpness': lambda im, m, neg, cubic, fill: sharpness(im, _enhance_level(m)),
    'SharpnessIncreasing': lambda im, m, neg, cubic, fill: sharpness(im, _enhance_increasing_level(m, neg)),
    'ShearX': lambda im, m, neg, cubic, fill: shear_x(im, _negate(_level(m, 0.3), neg), cubic, fill),
    'ShearY': lambda im, m, neg, cubic, fill: shear_y(im, _negate(_level(m, 0.3), neg), cubic, fill),
    'TranslateXRel': lambda im, m, neg, cubic, fill: translate_x_rel(im, _negate(_level(m, 0.45), neg), cubic, fill),
    'TranslateYRel': lambda im, m, neg, cubic, fill: translate_y_rel(im, _negate(_level(m, 0.45), neg), cubic, fill),
}

_RAND_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
    'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_RAND_INCREASING_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
    'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
    'TranslateXRel', 'TranslateYRel')


# ---------------------------------------------------------------------------------------------------------------
# The config string and the per-image draws.

@dataclasses.dataclass(frozen=True)
class Config:
  """A parsed config string; the defaults are timm's (rand-m10-n2-p0.5-mstd0-mmax10-inc0)."""
  magnitude: int = 10
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0  # inf: uniform(0, magnitude)
  magnitude_max: int = 10
  increasing: bool = False

  @property
  def transforms(self) -> tuple[str, ...]:
    return _RAND_INCREASING_TRANSFORMS if self.increasing else _RAND_TRANSFORMS


# section key -> (Config field, type, valid, what valid means)
_SECTIONS = {
    'm': ('magnitude', int, lambda v: v >= 0, 'a non-negative int'),
    'n': ('num_layers', int, lambda v: v >= 0, 'a non-negative int'),
    'p': ('prob', float, lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    'mstd': ('magnitude_std', float, lambda v: v >= 0, 'a non-negative float (> 100: uniform)'),
    'mmax': ('magnitude_max', int, lambda v: v > 0, 'a positive int'),
    'inc': ('increasing', int, lambda v: v in (0, 1), '0 or 1'),
}


def parse_config(config_str: str) -> Config:
  """timm's `rand_augment_transform` config string, e.g. 'rand-m9-mstd0.5-inc1': 'rand', then key+value sections."""
  if not (isinstance(config_str, str) and config_str.split('-')[0] == 'rand'):
    raise ValueError(f'config_str must be a timm RandAugment string such as "rand-m9-mstd0.5-inc1", '
                     f'got {config_str!r}')
  values = {}
  for section in config_str.split('-')[1:]:
    key, value = re.fullmatch(r'(\D*)(.*)', section).groups()  # timm: the key is what precedes the first digit
    if key not in _SECTIONS or not value:
      raise ValueError(f'config_str {config_str!r}: section {section!r} is not one of m<int>, n<int>, p<float>, '
                       'mstd<float>, mmax<int>, inc<0|1> (transform sets t... and weights are not implemented)')
    field, kind, valid, what = _SECTIONS[key]
    if field in values:
      raise ValueError(f'config_str {config_str!r}: section {key!r} is given twice')
    try:
      parsed = kind(value)
    except ValueError:
      parsed = None
    if parsed is None or not valid(parsed):
      raise ValueError(f'config_str {config_str!r}: section {section!r} needs {what} after {key!r}')
    values[field] = parsed
  if values.get('magnitude_std', 0) > 100:  # timm's switch to uniform sampling
    values['magnitude_std'] = math.inf
  values['increasing'] = bool(values.get('increasing', 0))
  return Config(**values)


class Draws(NamedTuple):
  """One image's random choices, one entry per layer."""
  index: tf.Tensor  # int32: the op, an index into Config.transforms (uniform, with replacement)
  applied: tf.Tensor  # bool: the op runs (probability p)
  magnitude: tf.Tensor  # float64, clipped to [0, magnitude_max]
  negate: tf.Tensor  # bool: the argument's random sign (ops with one)
  bicubic: tf.Tensor  # bool: bicubic, else bilinear (geometric ops)


def _draw(seed, config: Config, interpolation: str) -> Draws:
  """The random choices timm makes per image and per op call (np.random.choice, random.random, random.gauss,
  random.choice), drawn for all layers at once from `seed`."""
  n = config.num_layers
  s_index, s_apply, s_magnitude, s_sign, s_interpolation = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  uniform = lambda s: tf.random.stateless_uniform([n], s, dtype=tf.float64)
  if math.isinf(config.magnitude_std):
    magnitude = uniform(s_magnitude) * config.magnitude
  else:
    magnitude = tf.random.stateless_normal([n], s_magnitude, config.magnitude, config.magnitude_std, tf.float64)
  bicubic = {'random': uniform(s_interpolation) < 0.5, 'bicubic': tf.ones([n], tf.bool),
             'bilinear': tf.zeros([n], tf.bool)}[interpolation]
  return Draws(index=tf.random.stateless_uniform([n], s_index, 0, len(config.transforms), tf.int32),
               applied=uniform(s_apply) < config.prob,
               magnitude=tf.clip_by_value(magnitude, 0.0, float(config.magnitude_max)),
               negate=uniform(s_sign) < 0.5, bicubic=bicubic)


def rand_augment(image, seed, config: Config, interpolation: str = 'random', fill=FILL):
  """One uint8 RGB (H, W, 3) image through `config.num_layers` layers; `seed` is a shape-[2] stateless seed,
  `interpolation` the geometric ops' resampling ('bilinear', 'bicubic' or 'random': either, per op call), `fill`
  the colour where they uncover the image."""
  draws = _draw(seed, config, interpolation)
  ops = [NAME_TO_OP[name] for name in config.transforms]

  def layer(i, image):
    args = (image, draws.magnitude[i], draws.negate[i], draws.bicubic[i], fill)
    branches = [functools.partial(op, *args) for op in ops] + [lambda: image]  # the last: not applied
    index = tf.where(draws.applied[i], draws.index[i], len(ops))
    return i + 1, tf.ensure_shape(tf.switch_case(index, branches), image.shape)

  # A loop rather than a Python for: the 15 branches are traced once, whatever num_layers is.
  return tf.while_loop(lambda i, _: i < config.num_layers, layer, (tf.constant(0), image))[1]


def rand_augment_transform(config_str: str = 'rand-m9-mstd0.5-inc1', interpolation: str = 'random', fill=FILL):
  """Checks the arguments and returns f(image, seed), timm's `rand_augment_transform(config_str, hparams)`."""
  config = parse_config(config_str)
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {", ".join(INTERPOLATIONS)}, got {interpolation!r}')
  if not (isinstance(fill, (tuple, list)) and len(fill) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in fill)):
    raise ValueError(f'fill must be an (r, g, b) triple of ints in [0, 255], got {fill!r}')
  return lambda image, seed: rand_augment(image, seed, config, interpolation, tuple(fill))
