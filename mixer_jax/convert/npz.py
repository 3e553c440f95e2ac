"""Google's MLP-Mixer `.npz` checkpoints (gs://mixer_models/...) <-> mixer_jax parameter trees.

The standard layout is the flax parameter tree flattened with '/': it unflattens straight into our Mixer. The
legacy pre-Linen layout (`Mixer/encoderblock_{i}/token_mixing_phase_0/kernel1`, ...; detected by a top-level
`Mixer` key, never assumed) is renamed and squeezed into it (`_LEGACY_RULES`). A top-level `opt/target/` or
`params/` prefix (optimizer or variables dumps) is stripped. Shapes are checked by the caller against a model.
"""
import re

import numpy as np
from flax import traverse_util

from mixer_jax.convert import files

_PREFIXES = ('opt/target/', 'params/')
_LEGACY_RULES = [  # legacy key -> standard key, applied in order
    (r'^embedding/', 'stem/'),
    (r'^Mixer/encoder_norm/', 'pre_head_layer_norm/'),
    (r'^Mixer/encoderblock_(\d+)/', r'MixerBlock_\1/'),
    (r'/(token|channel)_mixing_phase_0/kernel1$', r'/\1_mixing/Dense_0/kernel'),
    (r'/(token|channel)_mixing_phase_0/bias1$', r'/\1_mixing/Dense_0/bias'),
    (r'/(token|channel)_mixing_phase_0/kernel2$', r'/\1_mixing/Dense_1/kernel'),
    (r'/(token|channel)_mixing_phase_0/bias2$', r'/\1_mixing/Dense_1/bias'),
]


def _strip_prefix(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for prefix in _PREFIXES:
    if flat and all(k.startswith(prefix) for k in flat):
      return {k[len(prefix):]: v for k, v in flat.items()}
  return flat


def _from_legacy(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in flat.items():
    new = key
    for pattern, replacement in _LEGACY_RULES:
      new = re.sub(pattern, replacement, new)
    # legacy MLP weights carry singleton dimensions
    out[new] = np.squeeze(value) if '_mixing_phase_0/' in key else value
  return out


def read(path: str) -> dict:
  """The parameter tree (nested dicts of numpy arrays) of a Mixer .npz in either layout."""
  flat = _strip_prefix(files.read_npz(path))
  if any(k.startswith('Mixer/') for k in flat):
    flat = _from_legacy(flat)
  return traverse_util.unflatten_dict(flat, sep='/')


def write(params, path: str) -> None:
  """Writes params in the standard layout of the official files (float32 arrays, '/'-joined keys)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  with open(path, 'wb') as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
