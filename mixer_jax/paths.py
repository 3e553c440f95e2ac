"""The paths a user gives (workdirs, checkpoints, data folders, outputs) as the file system sees them.

A command may be run from any directory and its workdir read later from another one (`eval.py` reads the config.json
that `train.py` wrote), and orbax refuses relative paths, so every path is made absolute where it enters: `~` is
expanded, relative paths are taken from the current directory, and a trailing slash is dropped. URLs
(`gs://bucket/run`) are left as they are.

This module owns that spelling. It must not open or create anything.
"""
import os
import re


def is_url(path: str) -> bool:
  return re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*://', path) is not None


def resolve(path: str | None) -> str | None:
  """`path` absolute, with `~` expanded and no trailing slash; URLs, '' and None unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))

