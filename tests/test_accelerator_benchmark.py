"""benchmarks/accelerator.py at tiny sizes on CPU: ready for the day an accelerator is lent."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from run_files import cli_env


def test_the_accelerator_benchmark_measures_every_section_and_writes_its_table(tmp_path):
  """Every section runs (none fails), the JSON holds what the table prints, and the rates
  follow from the step times and the counted FLOPs. No peak on CPU: MFU / HFU are empty."""
  out = tmp_path / "accelerator.json"
  proc = subprocess.run(
      [sys.executable, "benchmarks/accelerator.py", "--size=tiny", f"--json={out}"],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=900,
      env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["platform"] == "cpu" and report["peak_tflops"] is None
  assert all("error" not in row for row in report["rows"]), report["rows"]
  sections = [row["section"] for row in report["rows"]]
  # CPU has no fused attention: XLA attention with the dropout PRNG 'auto' picks (threefry)
  # and with rbg; one decode row (the tiny config computes in float32).
  assert sections == ["bb", "vim", "vim", "decode"]
  bb, vim, vim_rbg, decode = report["rows"]
  assert (vim["dropout_rng"], vim_rbg["dropout_rng"]) == ("threefry2x32", "rbg")
  assert vim_rbg["model_gflop_per_step"] == vim["model_gflop_per_step"]
  assert bb["images_per_s"] == pytest.approx(4 / (bb["step_ms"] / 1e3), rel=1e-6)
  assert bb["r1_step_gflop"] > bb["model_gflop_per_step"]  # R1 is costlier than the mean
  assert bb["model_tflops_per_s"] == pytest.approx(
      bb["model_gflop_per_step"] / bb["step_ms"], rel=1e-6
  )
  assert vim["tokens_per_s"] == pytest.approx(4 * 64 / (vim["step_ms"] / 1e3), rel=1e-6)
  assert vim["attention"] == "xla" and vim["mfu"] is None and vim["hfu"] is None
  assert 0 < vim["model_gflop_per_step"] <= vim["hardware_gflop_per_step"]
  assert decode["floor_ratio"] == pytest.approx(decode["step_ms"] / decode["floor_ms"])
  assert decode["spec_floor_ms"] is None  # no published bandwidth for a CPU
  assert decode["tokens_per_s"] == pytest.approx(4 / (decode["step_ms"] / 1e3), rel=1e-6)
  for row in report["rows"]:  # the printed table holds each row
    assert row["what"] in proc.stdout
  assert "| measurement | time | rate |" in proc.stdout


def test_an_unknown_section_is_a_clear_error():
  proc = subprocess.run(
      [sys.executable, "benchmarks/accelerator.py", "--only=bb,fid"],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      env=cli_env(),
  )
  assert proc.returncode == 2 and "unknown section 'fid'" in proc.stderr
