"""The evaluation pre-processing a family's checkpoints expect at any resolution: `eval.py`'s default pp.

timm's `crop_pct` convention, resize the shorter side to floor(resolution / crop_pct), centre-crop `resolution`:
  * mixer: big_vision's `resize_small(256)|central_crop(224)` (crop_pct 0.875, area resize), values in [-1, 1].
  * convmixer: crop_pct 0.96, bicubic, ImageNet mean/std (timm's pretrained config).
  * davit: crop_pct 0.9, bicubic, ImageNet mean/std (the official DaViT evaluation; timm's uses 0.95).
Bicubic resizes use `antialias=True` to match PIL, which timm's evaluation uses. At 224 these are the eval strings
the pre-training recipes write themselves (configs/*_i1k.py; tests/test_recipes.py keeps them equal); the
training strings live only in the recipes.

This module owns the strings only; `ops.parse` checks them.
"""
import math

FAMILIES = ('mixer', 'convmixer', 'davit')
_CROP_PCT = {'mixer': 0.875, 'convmixer': 0.96, 'davit': 0.9}


def eval_pp(family: str, *, resolution: int = 224, num_classes: int = 1000, label_key: str = 'label') -> str:
  """The evaluation pp string of a family's checkpoints (see the module docstring)."""
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; known: {", ".join(FAMILIES)}')
  if not (isinstance(resolution, int) and resolution > 0 and isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'resolution and num_classes must be positive ints, got {resolution!r}, {num_classes!r}')
  short_side = math.floor(resolution / _CROP_PCT[family])
  if family == 'mixer':
    image = f'decode|resize_small({short_side})|central_crop({resolution})|value_range(-1, 1)'
  else:  # normalize's defaults are ImageNet's mean/std
    image = f'decode|resize_small({short_side}, method="bicubic", antialias=True)|central_crop({resolution})|normalize'
  return f'{image}|onehot({num_classes}, key="{label_key}", key_result="labels")|keep("image", "labels")'
