"""The repository's Python is formatted (pyink) and lint-clean (ruff): pyproject.toml's settings.

Both tools come with the test extra (setup.py). To fix what these tests report, run from the
repository root: `pyink . && ruff check --fix .` (what ruff cannot fix, it names: fix it by hand).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every Python file we own (notebooks are not formatted).
PATHS = ["vim_jax", "configs", "tests", "benchmarks", "setup.py"]
# Enough of a report to act on; the command itself shows the rest.
MAX_REPORT_LINES = 300


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
  if importlib.util.find_spec(tool) is None:
    # A failure, not a skip: a suite without the tool would pass with the repository unchecked.
    pytest.fail(f"{tool} is not installed (it comes with the test extra: pip install '.[test]')")
  return subprocess.run(
      [sys.executable, "-m", tool, *args, *PATHS],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )


def _report(result: subprocess.CompletedProcess, fix: str) -> str:
  lines = (result.stdout + result.stderr).splitlines()
  if len(lines) > MAX_REPORT_LINES:
    lines = lines[:MAX_REPORT_LINES] + [f"... ({len(lines) - MAX_REPORT_LINES} more lines)"]
  command = " ".join(result.args[2:])  # [python, -m, tool, args..., paths...]
  return "\n".join([f"`{command}` failed; fix with `{fix}`:", *lines])


def test_code_is_formatted():
  result = _run("pyink", "--check", "--diff", "--quiet")
  assert result.returncode == 0, _report(result, "pyink .")


def test_lint_is_clean():
  # --no-cache: nothing written into the checkout.
  result = _run("ruff", "check", "--no-fix", "--no-cache", "--output-format", "full")
  assert result.returncode == 0, _report(result, "ruff check --fix .")
