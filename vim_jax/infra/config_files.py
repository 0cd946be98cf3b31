"""Config files (configs/*.py) loaded by path, from any working directory.

A config file imports what it shares with the others as `from configs import common`. Loaded
by path, that needs the folder above configs/ on sys.path: `python -m` puts the working
directory there, which is the repository root only when the command starts in it. The
commands call `add_config_roots(argv)` before parsing their flags, so a config given by an
absolute or relative path works from anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Flags whose value is a config file path, optionally with ':variant'.
CONFIG_FLAGS = ("--config=", "--tokenizer_config=")


def add_config_root(path: str) -> None:
  """Puts the folder holding the config file's package (configs/) on sys.path."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path.partition(":")[0])))
  if root not in sys.path:
    sys.path.insert(0, root)


def add_config_roots(argv: list[str]) -> None:
  for arg in argv:
    for flag in CONFIG_FLAGS:
      if arg.startswith(flag):
        add_config_root(arg[len(flag) :])


def load(spec: str):
  """Loads 'path/to/config.py[:variant]' the way --config does."""
  path, _, variant = spec.partition(":")
  add_config_root(path)
  module_spec = importlib.util.spec_from_file_location("_vim_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
