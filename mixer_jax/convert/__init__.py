"""Checkpoint converters: external weight formats <-> mixer_jax variables, always shape-checked.

`from_timm` / `to_timm`: timm (PyTorch) state dicts of all three families.
"""
from mixer_jax.convert.timm import from_timm, to_timm

__all__ = ['from_timm', 'to_timm']
