"""The compile-only memory report: shapes only, per-device memory that follows the layout."""

import re
import subprocess
import sys

from conftest import REPO_ROOT


def test_fsdp_divides_the_state_over_devices():
  from configs import vim_base
  from vim_jax import compile_report
  config = vim_base.get_config("tiny")
  config.update(batch_size=8)
  config.mesh.update(data=8, fsdp=1, tensor=1)
  replicated = compile_report.report(config, tokens_per_image=64, codebook_size=512)
  config.mesh.update(data=1, fsdp=8, tensor=1)
  fsdp = compile_report.report(config, tokens_per_image=64, codebook_size=512)
  assert fsdp["params"] == replicated["params"] > 0
  # Params + Adam moments (3 x 4 bytes per param) dominate the arguments; FSDP splits them 8 ways.
  state_bytes = 12 * replicated["params"]
  assert replicated["argument_bytes"] >= state_bytes
  assert fsdp["argument_bytes"] < replicated["argument_bytes"] / 4
  assert fsdp["total_bytes"] > 0 and "per-device memory" in fsdp["summary"]


def test_cli_reports_a_stage1_config_without_weights_or_data():
  """The full objective (LPIPS and the GAN) compiled data-parallel on 8 devices: the only
  cross-device traffic is the gradient all-reduce. LPIPS's image pair and the discriminator's
  minibatch-stddev groups (4 consecutive examples, 4 per device here) stay on their device."""
  out = subprocess.run(
      [sys.executable, "-m", "vim_jax.compile_report", "--config=configs/vitvq_base.py:tiny",
       "--config.loss.perceptual=0.1", "--config.perceptual_weights=/nonexistent",
       "--num_cpu_devices=8", "--config.batch_size=32"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 8 x cpu" in out.stdout and "per device: arguments" in out.stdout
  line = next(l for l in out.stdout.splitlines() if l.startswith("collectives"))
  counts = {op: int(n) for op, n in re.findall(r"([a-z-]+) (\d+)", line.split(":")[1])}
  # Measured with the old layouts: LPIPS's concatenated pair needed 18 all-to-alls and 22
  # collective-permutes, StyleGAN2's strided stddev groups 22 all-reduces instead of 5.
  assert counts["all-to-all"] == 0 and counts["collective-permute"] == 0, line
  assert 1 <= counts["all-reduce"] <= 8, line  # gradients and metrics (XLA combines them)
