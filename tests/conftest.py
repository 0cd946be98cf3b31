"""Test set-up: 8 virtual CPU devices (for sharding tests) and private temp/cache folders.

Must run before jax is imported anywhere, which pytest guarantees for conftest.py.
"""

import os
import sys
import tempfile

_TMP = tempfile.mkdtemp(prefix="vim_jax_tests_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TFDS_DATA_DIR"] = os.path.join(_TMP, "tfds")
os.environ["TMPDIR"] = _TMP
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
tempfile.tempdir = _TMP

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  """The tiny stage-1 config (shapes data, 32 px), fresh for each test."""
  from configs import vitvq_base
  return vitvq_base.get_config("tiny")
