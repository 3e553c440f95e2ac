"""Pre-processing ops and the big_vision-style pp mini-language that composes them.

A pp string is ops joined by `|`, each a registered name with Python-literal arguments:

    decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)|onehot(1000)|keep("image", "labels")

`parse(pp)` checks every op name and binds every argument when the string is parsed (a `ValueError` naming the
op), and returns a `Pipeline`: a function from one example (a dict of tensors) to another, run inside
`tf.data.Dataset.map`. Image ops take `key` (default "image"), or `inkey`/`outkey` to read one feature and
write another, as in big_vision. Geometric ops keep the dtype (uint8 in, uint8 out); `value_range` and
`normalize` produce float32.

Randomness: an op registered with `random=True` takes its seed from the example's `_seed` entry (a shape-[2]
int64 stateless seed set by `mixer_jax.data.pipeline` from the example's position in the stream) and replaces
`_seed` with a fresh one for the next random op. Every random draw is a `tf.random.stateless_*` op, so an
example's augmentation depends only on its seed, never on TF's global random state.

A new op is a factory decorated with `@register(name, random=..., keyed=...)` that checks its arguments and
returns the per-example function (of the image, and of a seed if random; of the whole dict if not keyed).

Train crops follow their recipe's source: `(decode_jpeg_and_)inception_crop` is big_vision's sampler (Mixer);
`(decode_jpeg_and_)random_resized_crop` is timm's RandomResizedCropAndInterpolation with PIL's resizing
(ConvMixer, DaViT).

This module owns the ops and the parser; it reads no data and knows nothing about batching or processes.
"""
import ast
import dataclasses
import inspect
import math
from typing import Callable

import tensorflow as tf

from mixer_jax.data import randaug as randaug_lib
from mixer_jax.data import randaug_timm as randaug_timm_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESIZE_METHODS = ('area', 'bicubic', 'bilinear', 'gaussian', 'lanczos3', 'lanczos5', 'mitchellcubic', 'nearest')
_PAD_MODES = ('constant', 'reflect', 'symmetric')
SEED_KEY = '_seed'


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Callable[..., Callable]
  random: bool
  keyed: bool  # True: factory returns f(tensor[, seed]) applied to data[inkey] -> data[outkey]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, random: bool = False, keyed: bool = True):
  """Files the factory under `name`. A factory validates its arguments and returns the per-example function."""
  def deco(factory):
    if name in _REGISTRY:
      raise ValueError(f'pp op {name!r} is registered twice')
    _REGISTRY[name] = _Entry(factory, random, keyed)
    return factory
  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  text: str  # the op as written in the pp string
  random: bool
  fn: Callable[[dict], dict]

  def __call__(self, data: dict) -> dict:
    return self.fn(data)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A parsed pp string: applies its ops in order to one example."""
  ops: tuple[Op, ...]

  def __call__(self, data: dict) -> dict:
    for op in self.ops:
      data = op(data)
    return data

  def __str__(self):
    return '|'.join(op.text for op in self.ops)

  def split_deterministic(self) -> tuple['Pipeline', 'Pipeline']:
    """(the ops before the first random op, the rest): what a 'decoded' cache may store."""
    i = next((i for i, op in enumerate(self.ops) if op.random), len(self.ops))
    return Pipeline(self.ops[:i]), Pipeline(self.ops[i:])


def _split_ops(pp: str) -> list[str]:
  """Splits on the `|` that are outside brackets and quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(pp):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '"\'':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == '|' and depth == 0:
      parts.append(pp[start:i])
      start = i + 1
  parts.append(pp[start:])
  return [p.strip() for p in parts]


def _literal(node, text):
  try:
    return ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError):
    raise ValueError(f'pp op {text!r}: arguments must be Python literals (numbers, strings, tuples), '
                     f'got {ast.unparse(node)!r}') from None


def _parse_call(text: str) -> tuple[str, tuple, dict]:
  try:
    node = ast.parse(text, mode='eval').body
  except SyntaxError:
    raise ValueError(f'pp op {text!r} is not of the form name or name(args)') from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f'pp op {text!r} is not of the form name or name(args)')
  if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
    raise ValueError(f'pp op {text!r}: *args and **kwargs are not supported')
  args = tuple(_literal(a, text) for a in node.args)
  kwargs = {k.arg: _literal(k.value, text) for k in node.keywords}
  return node.func.id, args, kwargs


def _next_seed(data: dict, op_name: str) -> tuple[tf.Tensor, dict]:
  """(a seed for this op, the example with a fresh `_seed` for the ops after it)."""
  if SEED_KEY not in data:
    raise ValueError(f'pp op {op_name!r} is random and needs a per-example {SEED_KEY!r} (shape [2] int64), '
                     'which mixer_jax.data pipelines set; add one to run the pp elsewhere')
  seeds = tf.random.experimental.stateless_split(data[SEED_KEY], 2)
  return seeds[0], {**data, SEED_KEY: seeds[1]}


def _keyed(name: str, apply: Callable, random: bool, inkey: str, outkey: str) -> Callable[[dict], dict]:
  def fn(data):
    if inkey not in data:
      raise KeyError(f'pp op {name!r} reads {inkey!r}, which the example lacks (keys: {sorted(data)})')
    if random:
      seed, data = _next_seed(data, name)
      return {**data, outkey: apply(data[inkey], seed)}
    return {**data, outkey: apply(data[inkey])}
  return fn


def make_op(text: str) -> Op:
  name, args, kwargs = _parse_call(text)
  if name not in _REGISTRY:
    raise ValueError(f'unknown pp op {name!r} in {text!r}; known ops: {", ".join(names())}')
  entry = _REGISTRY[name]
  if entry.keyed:
    key = kwargs.pop('key', 'image')
    inkey, outkey = kwargs.pop('inkey', key), kwargs.pop('outkey', key)
  signature = inspect.signature(entry.factory)
  try:
    signature.bind(*args, **kwargs)
  except TypeError as e:
    keys = ', key/inkey/outkey' if entry.keyed else ''
    raise ValueError(f'pp op {name!r}: {e} (signature: {name}{signature}{keys})') from None
  try:
    apply = entry.factory(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'pp op {name!r} in {text!r}: {e}') from None
  fn = _keyed(name, apply, entry.random, inkey, outkey) if entry.keyed else apply
  return Op(name, text, entry.random, fn)


def parse(pp: str) -> Pipeline:
  """Parses and validates a pp string; '' is the identity."""
  if not isinstance(pp, str):
    raise ValueError(f'a pp must be a string like "decode|resize(224)", got {pp!r}')
  return Pipeline(tuple(make_op(text) for text in _split_ops(pp) if text))


# ---------------------------------------------------------------------------------------------------------------
# Argument checks shared by the factories.

def _size(size) -> tuple[int, int]:
  """An int or an (h, w) pair of positive ints."""
  hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
  if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
    raise ValueError(f'size must be a positive int or an (h, w) pair of them, got {size!r}')
  return hw


def _choice(value, allowed, what):
  if value not in allowed:
    raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
  return value


def _range(lo, hi, what, *, lo_min=0.0, hi_max=float('inf')):
  if not all(isinstance(v, (int, float)) for v in (lo, hi)) or not lo_min <= lo <= hi <= hi_max:
    raise ValueError(f'{what} must satisfy {lo_min} <= min <= max <= {hi_max}, got ({lo}, {hi})')


def _cast_like(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """Back to the input dtype; uint8 is rounded and saturated (bicubic/lanczos overshoot [0, 255])."""
  if dtype == tf.uint8:
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(x, tf.float32)), 0, 255), tf.uint8)
  return tf.cast(x, dtype)


def _resize(image, hw, method, antialias):
  return _cast_like(tf.image.resize(image, hw, method=method, antialias=antialias), image.dtype)


def _decode(data: tf.Tensor, channels: int, precise: bool) -> tf.Tensor:
  if data.dtype != tf.string:  # a dataset that stores decoded pixels (tfds Tensor features)
    if channels == 0 or data.shape[-1] == channels:
      return data
    return tf.image.grayscale_to_rgb(data) if channels == 3 else tf.image.rgb_to_grayscale(data)
  if not precise:
    return tf.io.decode_image(data, channels=channels, expand_animations=False)
  # INTEGER_ACCURATE matches libjpeg's default (PIL, hence timm's evaluation); TF's default IDCT is faster.
  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.io.decode_jpeg(data, channels=channels, dct_method='INTEGER_ACCURATE'),
                 lambda: tf.io.decode_image(data, channels=channels, expand_animations=False))


def _inception_box(shape, seed, area_min, area_max, ratio_min, ratio_max):
  """(begin, size) of a random crop covering area_min..area_max % of the image with aspect ratio in range."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      min_object_covered=0.0,  # the area range alone bounds the crop (the default 0.1 would raise area_min)
      aspect_ratio_range=(ratio_min, ratio_max), area_range=(area_min / 100, area_max / 100),
      max_attempts=100, use_image_if_no_bounding_boxes=True)
  return begin, size


def _crop(image, begin, size):
  """tf.slice that keeps the static channel count (tf.slice with tensor sizes forgets it)."""
  return tf.ensure_shape(tf.slice(image, begin, size), [None, None, image.shape[-1]])


def _check_inception(size, area_min, area_max, ratio_min, ratio_max, method):
  _range(area_min, area_max, 'area_min/area_max (percent)', lo_min=1e-6, hi_max=100)
  _range(ratio_min, ratio_max, 'ratio_min/ratio_max', lo_min=1e-6)
  _choice(method, _RESIZE_METHODS, 'method')
  return None if size is None else _size(size)


def _rrc_box(height, width, u_area, u_log_ratio, u_top, u_left, scale, ratio):
  """timm's RandomResizedCropAndInterpolation.get_params as a pure function of its uniform draws: (top, left, h, w).

  u_area, u_log_ratio: [10] uniforms in [0, 1), one pair per try (timm's random.uniform(a, b) is a + (b - a) * u);
  u_top, u_left: the uniforms behind timm's inclusive randint(0, n), taken as floor(u * (n + 1)). The arithmetic is
  float64 as Python's floats (float32 moves about 1 box in 10,000), and tf.round rounds half to even as Python's
  round, so the box is timm's.
  """
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = (scale[0] + (scale[1] - scale[0]) * u_area) * (h * w)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u_log_ratio)
  try_w, try_h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (try_w <= w) & (try_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # the first try that fits (0 when none does; `fits` decides)
  found = fits[first]
  # No try fits: the centre crop of the largest window whose ratio is clamped to the range.
  fallback_w = tf.where(w / h > ratio[1], tf.round(h * ratio[1]), w)
  fallback_h = tf.where(w / h < ratio[0], tf.round(w / ratio[0]), h)
  # A side that rounds to 0 (an image of a few pixels) becomes 1, where timm would hand PIL an empty crop and fail.
  crop_h = tf.maximum(tf.where(found, try_h[first], fallback_h), 1)
  crop_w = tf.maximum(tf.where(found, try_w[first], fallback_w), 1)
  top = tf.where(found, tf.floor(u_top * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
  left = tf.where(found, tf.floor(u_left * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def _rrc_sample(shape, seed, scale, ratio):
  """((top, left, h, w), whether method "random" picks bilinear) from one stateless draw of 23 uniforms."""
  tries = 10  # timm's
  u = tf.random.stateless_uniform([2 * tries + 3], seed, dtype=tf.float64)
  box = _rrc_box(shape[0], shape[1], u[:tries], u[tries:2 * tries], u[2 * tries], u[2 * tries + 1], scale, ratio)
  return box, u[2 * tries + 2] < 0.5


def _resize_pil(image, hw, method):
  """PIL's antialiased Image.resize of a uint8 image, as timm's transforms run it.

  tf.image.resize(antialias=True) has PIL's kernels (triangle; cubic with a = -0.5) stretched by the downscale
  factor, but computes in float in one go; PIL makes two 1-D passes, each rounded half up to uint8. Pillow 13 goes
  vertical first when the height shrinks by more than twice as many pixels as the width (measured: the rule holds
  on every size pair tried; older Pillow always goes horizontal first). Doing the same is cheap and takes the
  mean |difference| to PIL from ~0.2 levels (max 7, bicubic) to ~0.004 (max 2): what remains is where PIL's
  fixed-point weights round a value near .5 the other way.
  """
  def one_pass(x, size):
    return tf.cast(tf.clip_by_value(tf.floor(tf.image.resize(x, size, method, antialias=True) + 0.5), 0, 255),
                   tf.uint8)

  h, w = tf.shape(image)[0], tf.shape(image)[1]
  return tf.cond((hw[0] < h) & (h - hw[0] > 2 * (w - hw[1])),
                 lambda: one_pass(one_pass(image, tf.stack([hw[0], w])), hw),
                 lambda: one_pass(one_pass(image, tf.stack([h, hw[1]])), hw))


def _rrc_resize(image, hw, method, antialias, bilinear):
  """Resizes the crop to hw: PIL's passes for uint8 bilinear/bicubic with antialias, tf.image.resize otherwise."""
  if method == 'random':
    return tf.cond(bilinear, lambda: _rrc_resize(image, hw, 'bilinear', antialias, bilinear),
                   lambda: _rrc_resize(image, hw, 'bicubic', antialias, bilinear))
  if image.dtype == tf.uint8 and antialias and method in ('bilinear', 'bicubic'):
    return _resize_pil(image, hw, method)
  return _resize(image, hw, method, antialias)


def _check_rrc(size, scale, ratio, method):
  for name, pair in (('scale', scale), ('ratio', ratio)):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(f'{name} must be a (min, max) pair, got {pair!r}')
  _range(*scale, 'scale (min, max fraction of the area)', lo_min=1e-6, hi_max=1)
  _range(*ratio, 'ratio (min, max width / height)', lo_min=1e-6)
  _choice(method, _RESIZE_METHODS + ('random',), 'method')
  return _size(size)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and geometry.

@register('decode')
def decode(channels=3, precise=False):
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, channels); channels=3 turns grayscale into RGB."""
  _choice(channels, (0, 1, 3), 'channels')
  return lambda data: _decode(data, channels, precise)


@register('decode_jpeg_and_inception_crop', random=True)
def decode_jpeg_and_inception_crop(size=None, area_min=5, area_max=100, ratio_min=0.75, ratio_max=1.33,
                                   method='bilinear', antialias=False):
  """Inception crop decoding only the cropped window of a JPEG (other formats are decoded whole first)."""
  hw = _check_inception(size, area_min, area_max, ratio_min, ratio_max, method)
  box = lambda shape, seed: _inception_box(shape, seed, area_min, area_max, ratio_min, ratio_max)

  def apply(data, seed):
    def jpeg():
      begin, crop = box(tf.image.extract_jpeg_shape(data), seed)
      return tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=3)

    def other():
      image = _decode(data, 3, precise=False)
      begin, crop = box(tf.shape(image), seed)
      return _crop(image, begin, crop)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return image if hw is None else _resize(image, hw, method, antialias)
  return apply


@register('inception_crop', random=True)
def inception_crop(size=None, area_min=5, area_max=100, ratio_min=0.75, ratio_max=1.33, method='bilinear',
                   antialias=False):
  """Random crop of area_min..area_max % of the image, aspect ratio in [ratio_min, ratio_max], resized to size."""
  hw = _check_inception(size, area_min, area_max, ratio_min, ratio_max, method)

  def apply(image, seed):
    begin, crop = _inception_box(tf.shape(image), seed, area_min, area_max, ratio_min, ratio_max)
    image = _crop(image, begin, crop)
    return image if hw is None else _resize(image, hw, method, antialias)
  return apply


@register('decode_jpeg_and_random_resized_crop', random=True)
def decode_jpeg_and_random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method='random',
                                        antialias=True):
  """random_resized_crop decoding only the crop window of a JPEG (other formats are decoded whole first).

  JPEGs are decoded with libjpeg's accurate IDCT, which gives PIL's (hence timm's) pixels exactly. The window equals
  decoding whole and cropping for 4:4:4 JPEGs; with subsampled chroma (4:2:0, the common case) libjpeg upsamples
  the chroma of the window's first and last columns from inside the window, which moves those columns by a few
  levels (up to ~20) and leaves the rest exact.
  """
  hw = _check_rrc(size, scale, ratio, method)

  def apply(data, seed):
    def jpeg():
      (top, left, h, w), bilinear = _rrc_sample(tf.image.extract_jpeg_shape(data), seed, scale, ratio)
      window = tf.stack([top, left, h, w])
      return tf.image.decode_and_crop_jpeg(data, window, channels=3, dct_method='INTEGER_ACCURATE'), bilinear

    def other():
      image = _decode(data, 3, precise=False)
      (top, left, h, w), bilinear = _rrc_sample(tf.shape(image), seed, scale, ratio)
      return _crop(image, tf.stack([top, left, 0]), tf.stack([h, w, -1])), bilinear

    image, bilinear = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return _rrc_resize(image, hw, method, antialias, bilinear)
  return apply


@register('random_resized_crop', random=True)
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method='random', antialias=True):
  """timm's RandomResizedCropAndInterpolation: a crop of scale (fraction of the area) and log-uniform ratio
  (width / height), the first of 10 tries that fits, else the centre crop of the largest window with the ratio
  clamped to the range; resized to `size`. `method="random"` picks bilinear or bicubic per image, as timm.

  The box is timm's arithmetic exactly (`_rrc_box`). uint8 bilinear/bicubic resizing with antialias follows PIL's
  two rounded passes (`_resize_pil`): on photo-like images, down- and upscaling, within 2 levels of PIL's
  Image.resize, ~0.4% of the pixels off by 1 on average (at most 6%) for bilinear, ~0.01% (at most 0.2%) for
  bicubic; other methods and dtypes use tf.image.resize.
  """
  hw = _check_rrc(size, scale, ratio, method)

  def apply(image, seed):
    (top, left, h, w), bilinear = _rrc_sample(tf.shape(image), seed, scale, ratio)
    image = _crop(image, tf.stack([top, left, 0]), tf.stack([h, w, -1]))
    return _rrc_resize(image, hw, method, antialias, bilinear)
  return apply


@register('resize')
def resize(size, method='bilinear', antialias=False):
  """Resizes both sides to `size` (int or (h, w)), ignoring the aspect ratio."""
  hw, method = _size(size), _choice(method, _RESIZE_METHODS, 'method')
  return lambda image: _resize(image, hw, method, antialias)


@register('resize_small')
def resize_small(size, method='area', antialias=False):
  """Resizes the shorter side to `size`, keeping the aspect ratio."""
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f'size (of the shorter side) must be a positive int, got {size!r}')
  _choice(method, _RESIZE_METHODS, 'method')

  def apply(image):
    h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    ratio = size / tf.minimum(h, w)
    hw = tf.cast(tf.round(tf.stack([h * ratio, w * ratio])), tf.int32)
    return _resize(image, hw, method, antialias)
  return apply


@register('central_crop')
def central_crop(size):
  hh, ww = _size(size)

  def apply(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    out = tf.image.crop_to_bounding_box(image, (h - hh) // 2, (w - ww) // 2, hh, ww)
    return tf.ensure_shape(out, [hh, ww, image.shape[-1]])  # the static size, which the crop forgets
  return apply


@register('random_crop', random=True)
def random_crop(size):
  hh, ww = _size(size)

  def apply(image, seed):
    out = tf.image.stateless_random_crop(image, tf.stack([hh, ww, tf.shape(image)[-1]]), seed=seed)
    return tf.ensure_shape(out, [hh, ww, image.shape[-1]])
  return apply


@register('flip_lr', random=True)
def flip_lr():
  return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed)


@register('pad')
def pad(pixels, mode='constant', value=0):
  """Pads `pixels` (int or (h, w)) on each side, e.g. pad(4)|random_crop(32) for CIFAR, pad(2) for 28 -> 32."""
  ph, pw = (pixels, pixels) if isinstance(pixels, int) else tuple(pixels)
  if not all(isinstance(p, int) and p >= 0 for p in (ph, pw)):
    raise ValueError(f'pixels must be a non-negative int or an (h, w) pair of them, got {pixels!r}')
  mode = _choice(mode, _PAD_MODES, 'mode').upper()
  return lambda image: tf.pad(image, [[ph, ph], [pw, pw], [0, 0]], mode=mode,
                              constant_values=tf.cast(value, image.dtype))


@register('grayscale_to_rgb')
def grayscale_to_rgb():
  """1 channel -> 3 identical channels; 3-channel images pass unchanged."""
  def apply(image):
    channels = image.shape[-1]
    if channels not in (1, 3, None):
      raise ValueError(f'grayscale_to_rgb needs 1 or 3 channels, got {channels}')
    return tf.ensure_shape(tf.tile(image, [1, 1, 3 // tf.shape(image)[-1]]), [None, None, 3])
  return apply


# ---------------------------------------------------------------------------------------------------------------
# Values.

@register('value_range')
def value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip_values=False):
  """Maps [in_min, in_max] linearly onto [vmin, vmax] as float32."""
  if in_max <= in_min:
    raise ValueError(f'in_max ({in_max}) must exceed in_min ({in_min})')

  def apply(image):
    x = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    return tf.clip_by_value(x, vmin, vmax) if clip_values else x
  return apply


@register('normalize')
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, in_max=255):
  """(image / in_max - mean) / std as float32, per channel; mean/std in [0, 1] units (timm's constants)."""
  if any(s <= 0 for s in tf.nest.flatten(std)) or in_max <= 0:
    raise ValueError(f'std and in_max must be positive, got std={std!r}, in_max={in_max!r}')
  return lambda image: (tf.cast(image, tf.float32) / in_max - tf.constant(mean, tf.float32)) / tf.constant(
      std, tf.float32)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation.

@register('randaug', random=True)
def randaug(num_layers=2, magnitude=10):
  """RandAugment(N, M) on uint8 RGB images; the op list and magnitudes are in `mixer_jax.data.randaug`."""
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise ValueError(f'num_layers must be a non-negative int, got {num_layers!r}')
  if not 0 <= magnitude <= 30:
    raise ValueError(f'magnitude must be in [0, 30] (10 is the reference maximum), got {magnitude!r}')

  def apply(image, seed):
    _check_uint8_rgb('randaug', image)
    return randaug_lib.distort_image_with_randaugment(image, num_layers, float(magnitude), seed)
  return apply


@register('randaug_timm', random=True)
def randaug_timm(config_str='rand-m9-mstd0.5-inc1', interpolation='random', fill=randaug_timm_lib.FILL):
  """timm's RandAugment (train.py's --aa config_str) on uint8 RGB images, equal to timm's PIL ops; geometric ops
  resample with `interpolation` (bilinear, bicubic or random: either, per op) and fill with `fill`. The config
  string and the ops are in `mixer_jax.data.randaug_timm`.
  """
  augment = randaug_timm_lib.rand_augment_transform(config_str, interpolation, fill)

  def apply(image, seed):
    _check_uint8_rgb('randaug_timm', image)
    return augment(image, seed)
  return apply


def _check_uint8_rgb(name, image):
  if image.dtype != tf.uint8 or image.shape[-1] != 3:
    raise ValueError(f'{name} works on uint8 RGB images, got {image.dtype.name} {image.shape}: put it before '
                     'value_range/normalize, after decode (channels=3) or grayscale_to_rgb')


# ---------------------------------------------------------------------------------------------------------------
# Labels and bookkeeping.

@register('onehot', keyed=False)
def onehot(depth, key='label', key_result='labels', multi=True, on=1.0, off=0.0, label_smoothing=0.0):
  """Integer label(s) at `key` -> float32 (depth,) at `key_result`.

  A vector of labels gives a multi-hot vector (`multi=True`, e.g. ImageNet-ReaL's `real_label`; an empty set
  gives all zeros). `label_smoothing=s` sets on = 1 - s + s/depth, off = s/depth (timm's convention); it cannot
  be combined with on/off. Defaults read tfds's `label` and write the `labels` the trainer reads, so
  `onehot(1000)` equals big_vision's `onehot(1000, key="label", key_result="labels")`.
  """
  if not (isinstance(depth, int) and depth > 0):
    raise ValueError(f'depth must be a positive int, got {depth!r}')
  if not 0 <= label_smoothing < 1:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing!r}')
  if label_smoothing and (on, off) != (1.0, 0.0):
    raise ValueError('give either label_smoothing or on/off, not both')
  if label_smoothing:
    on, off = 1 - label_smoothing + label_smoothing / depth, label_smoothing / depth

  def apply(data):
    if key not in data:
      raise KeyError(f'onehot reads {key!r}, which the example lacks (keys: {sorted(data)}); set key=...')
    labels = data[key]
    hot = tf.one_hot(labels, depth, on_value=1.0, off_value=0.0)
    if labels.shape.rank == 1:
      if not multi:
        raise ValueError(f'onehot: {key!r} holds several labels; pass multi=True for a multi-hot vector')
      hot = tf.reduce_max(tf.concat([tf.zeros([1, depth]), hot], 0), axis=0)  # the zero row: empty sets
    return {**data, key_result: hot * (on - off) + off}
  return apply


@register('keep', keyed=False)
def keep(*keys):
  """Keeps only `keys` (plus the pipeline's internal `_`-prefixed entries)."""
  if not keys or not all(isinstance(k, str) for k in keys):
    raise ValueError(f'keep needs one or more key names, got {keys!r}')

  def apply(data):
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(f'keep: the example has no {missing} (keys: {sorted(data)})')
    return {k: v for k, v in data.items() if k in keys or k.startswith('_')}
  return apply
