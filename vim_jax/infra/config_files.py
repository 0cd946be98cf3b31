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
CONFIG_FLAGS = ("--config", "--tokenizer_config")


def add_config_root(path: str) -> None:
  """Puts the folder holding the config file's package (configs/) on sys.path."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path.partition(":")[0])))
  if root not in sys.path:
    sys.path.insert(0, root)


def add_config_roots(argv: list[str]) -> None:
  """add_config_root for each CONFIG_FLAGS value in argv, written `--config=PATH` or, as absl
  also accepts, `--config PATH`."""
  for i, arg in enumerate(argv):
    name, equals, value = arg.partition("=")
    if name not in CONFIG_FLAGS:
      continue
    if not equals:
      value = argv[i + 1] if i + 1 < len(argv) else ""
    if value:
      add_config_root(value)


def load(spec: str):
  """Loads 'path/to/config.py[:variant]' the way --config does."""
  path, _, variant = spec.partition(":")
  add_config_root(path)
  module_spec = importlib.util.spec_from_file_location("_vim_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
