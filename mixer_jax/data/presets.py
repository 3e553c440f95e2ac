"""Pre-processing strings per model family (recipes.md sections 1, 4, 6, 7).

Eval: timm's `crop_pct` convention, resize the shorter side to floor(resolution / crop_pct), centre-crop
`resolution`:
  * mixer: big_vision's `resize_small(256)|central_crop(224)` (crop_pct 0.875, area resize), values in [-1, 1].
  * convmixer: crop_pct 0.96, bicubic, ImageNet mean/std (timm's pretrained config).
  * davit: crop_pct 0.9, bicubic, ImageNet mean/std (the official DaViT evaluation; timm's uses 0.95).
Bicubic resizes use `antialias=True` to match PIL, which timm's evaluation uses.

Train: the recipes' per-image augmentation; mixup/cutmix and random erasing follow on device (mixer_jax/mixup.py,
the recipe's `mixup` and `random_erasing` fields):
  * mixer (big_vision mlp_mixer_i1k): inception crop, flip, randaug(2, 15), [-1, 1].
  * convmixer / davit (timm's train.py transforms): timm's random-resized crop (scale 0.08-1, ratio 3/4-4/3,
    PIL's antialiased resize), flip, timm's RandAugment `rand-m9-mstd0.5-inc1`, both resampling with timm's
    --train-interpolation (ConvMixer 'random': bilinear or bicubic per call; DaViT 'bicubic'), ImageNet mean/std,
    one-hot with label smoothing 0.1 (timm folds the smoothing into the mixup targets the same way: smoothing then
    mixing equals mixing smoothed targets).

This module owns the strings only; `ops.parse` checks them.
"""
import math

FAMILIES = ('mixer', 'convmixer', 'davit')
_NORMALIZE = 'normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))'
_CROP_PCT = {'mixer': 0.875, 'convmixer': 0.96, 'davit': 0.9}
# timm train.py's --train-interpolation: its default 'random' in the ConvMixer runs; dingmyu/davit sets 'bicubic'
_TRAIN_INTERPOLATION = {'convmixer': 'random', 'davit': 'bicubic'}


def _check(family, resolution, num_classes):
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; known: {", ".join(FAMILIES)}')
  if not (isinstance(resolution, int) and resolution > 0 and isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'resolution and num_classes must be positive ints, got {resolution!r}, {num_classes!r}')


def _labels(num_classes, label_key, smoothing=0.0):
  smooth = f', label_smoothing={smoothing}' if smoothing else ''
  return f'onehot({num_classes}, key="{label_key}", key_result="labels"{smooth})|keep("image", "labels")'


def eval_pp(family: str, *, resolution: int = 224, num_classes: int = 1000, label_key: str = 'label') -> str:
  """The evaluation pp string of a family's checkpoints (see the module docstring)."""
  _check(family, resolution, num_classes)
  short_side = math.floor(resolution / _CROP_PCT[family])
  if family == 'mixer':
    image = f'decode|resize_small({short_side})|central_crop({resolution})|value_range(-1, 1)'
  else:
    image = (f'decode|resize_small({short_side}, method="bicubic", antialias=True)|central_crop({resolution})|'
             + _NORMALIZE)
  return f'{image}|{_labels(num_classes, label_key)}'


def train_pp(family: str, *, resolution: int = 224, num_classes: int = 1000, label_key: str = 'label') -> str:
  """The pre-training pp string of a family's recipe (see the module docstring)."""
  _check(family, resolution, num_classes)
  if family == 'mixer':
    image = f'decode_jpeg_and_inception_crop({resolution})|flip_lr|randaug(2, 15)|value_range(-1, 1)'
    return f'{image}|{_labels(num_classes, label_key)}'
  method = _TRAIN_INTERPOLATION[family]
  image = (f'decode_jpeg_and_random_resized_crop({resolution}, method="{method}")|flip_lr|'
           f'randaug_timm("rand-m9-mstd0.5-inc1", interpolation="{method}")|{_NORMALIZE}')
  return f'{image}|{_labels(num_classes, label_key, smoothing=0.1)}'
