"""Config files load by path from any working directory (vim_jax/infra/config_files.py)."""

import os
import sys

from conftest import REPO_ROOT

from vim_jax.infra import config_files


def test_config_roots_come_from_both_flag_spellings_absl_accepts(monkeypatch, tmp_path):
  """`--config=PATH` and `--config PATH` (and --tokenizer_config) each put the folder above the
  file's configs/ on sys.path, so that the file's `from configs import common` resolves."""
  monkeypatch.setattr(sys, "path", list(sys.path))
  roots = [str(tmp_path / name) for name in ("a", "b", "c", "d")]
  config_files.add_config_roots(
      [
          f"--config={roots[0]}/configs/x.py:tiny",
          "--tokenizer_config",
          f"{roots[1]}/configs/y.py",
          "--config",
          f"{roots[2]}/configs/z.py",
          f"--tokenizer_config={roots[3]}/configs/w.py",
          "--config.batch_size=8",  # an override, not a config file
          "--workdir=elsewhere/configs/not_a_config.py",
      ]
  )
  assert all(root in sys.path for root in roots)
  assert os.path.abspath("elsewhere") not in sys.path
  assert not any(p.endswith("/configs/x.py:tiny") for p in sys.path)


def test_a_config_loads_from_another_working_directory(monkeypatch, tmp_path):
  """A config file that imports configs.common, loaded by its path from a folder where
  `configs` is not importable otherwise."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT])
  for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
    monkeypatch.delitem(sys.modules, name)
  config = config_files.load(os.path.join(REPO_ROOT, "configs", "vitvq_ffhq.py"))
  assert config.data.source == "folder" and config.data.folder_eval_fraction == 0.0
  assert REPO_ROOT in sys.path
