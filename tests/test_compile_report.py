"""The compile-only report: shapes only, per-device memory that follows the layout, and real
TPU compiles for named slices through libtpu's compile-only devices."""

import re
import subprocess
import sys

import pytest

import readme_commands
from conftest import REPO_ROOT
from run_files import cli_env


def test_fsdp_divides_the_state_over_devices():
  from configs import vim_base
  from vim_jax import compile_report
  config = vim_base.get_config("tiny")
  config.update(batch_size=8)
  config.data.source = "tokens"  # no tokenizer: tokens_per_image and codebook_size give shapes
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


# --- Compiled for real TPU slices by libtpu (compile-only devices; no TPU needed) -------------

def test_slice_names_give_chips_and_torus_shapes():
  from vim_jax import tpu_slices
  expected = {"v4-8": (4, "v4:2x2x1"), "v4-32": (16, "v4:2x2x4"), "v4-128": (64, "v4:4x4x4"),
              "v4-256": (128, "v4:4x4x8"), "v5p-64": (32, "v5p:2x4x4"), "v5e-8": (8, "v5e:2x4"),
              "v5litepod-16": (16, "v5e:4x4"), "v6e-64": (64, "v6e:8x8"), "v5e-1": (1, "v5e:1x1")}
  for name, (chips, topology) in expected.items():
    spec = tpu_slices.parse(name)
    assert (spec.chips, spec.topology) == (chips, topology), name
  for bad in ("v4-4", "v4-12", "v3-8", "tpu-8", "v5e-6"):
    with pytest.raises(ValueError, match=f"--topology='{bad}'.*v4-N or v5p-N"):
      tpu_slices.parse(bad)


def _printed(text: str) -> dict[str, float]:
  """The numbers compile_report prints: GiB per chip and TFLOP per step."""
  found = {k: float(v) for k, v in re.findall(
      r"(arguments|outputs|temporaries|aliased|total) ([0-9.]+) GiB", text)}
  found["tflop"] = float(re.search(r"per step: ([0-9.e-]+) TFLOP", text).group(1))
  found["xla_tflop"] = float(re.search(r"cost analysis: ([0-9.e-]+) TFLOP", text).group(1))
  return found


def _assert_printed_equals_analysis(text, numbers):
  """What the CLI printed equals the compiled program's own memory and cost analyses (to the
  printed precision) and the FLOPs counted from the jaxpr."""
  compiled = numbers["compiled"]
  m = compiled.memory_analysis()
  printed = _printed(text)
  gib = lambda b: b / 2**30
  for name, value in (("arguments", m.argument_size_in_bytes), ("outputs", m.output_size_in_bytes),
                      ("temporaries", m.temp_size_in_bytes), ("aliased", m.alias_size_in_bytes),
                      ("total", m.argument_size_in_bytes + m.output_size_in_bytes +
                       m.temp_size_in_bytes - m.alias_size_in_bytes)):
    assert printed[name] == pytest.approx(gib(value), abs=6e-4), name
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert printed["xla_tflop"] == pytest.approx(cost["flops"] / 1e12, rel=1e-5)
  assert printed["tflop"] == pytest.approx(numbers["flops_per_device"] / 1e12, rel=1e-5)
  assert numbers["flops_per_device"] > 0


README_COMPILE_REPORT = readme_commands.find("python -m vim_jax.compile_report")
# The README's command at tiny size on the smallest v4 slice (a v4-128 compiles for minutes).
README_TINY_EDITS = (("configs/vim_large.py", "configs/vim_large.py:tiny"),
                     ("configs/vitvq_base.py", "configs/vitvq_base.py:tiny"),
                     ("--topology=v4-128", "--topology=v4-8"))


def test_tiny_configs_compile_for_a_v4_8_and_print_the_compiled_analysis(capsys):
  """Stage 1 with LPIPS and the GAN, and stage 2 tokenizing images inside its step, compiled
  for a v4-8: what the report prints equals the compiled program's analyses. Stage 2 goes
  through the README's compile_report command (read from README.md, :tiny on a v4-8, from the
  repository root), and the same config compiled here gives the analysis it printed (the TPU
  compiler is deterministic); stage 1 is compiled once, here, and printed as the CLI prints
  (its CLI path: test_cli_reports_a_stage1_config_without_weights_or_data)."""
  from configs import vim_large, vitvq_base
  from vim_jax import compile_report, tpu_slices
  spec = tpu_slices.parse("v4-8")
  devices = tpu_slices.compile_only_devices(spec)
  stage1 = vitvq_base.get_config("tiny")
  stage1.update(perceptual_weights="/nonexistent")  # shapes only: no file is read
  stage1.loss.perceptual = 0.1
  proc = subprocess.run(readme_commands.to_argv(README_COMPILE_REPORT, {}, README_TINY_EDITS),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        env=cli_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  capsys.readouterr()
  numbers = compile_report.report(stage1, devices, capacity_bytes=spec.generation.hbm_bytes)
  compile_report.print_report(stage1, numbers, spec)
  printed_stage1 = capsys.readouterr().out
  stage2 = compile_report.report(vim_large.get_config("tiny"), devices,
                                 capacity_bytes=spec.generation.hbm_bytes,
                                 tokenizer_config=vitvq_base.get_config("tiny"))
  for text, numbers in ((printed_stage1, numbers), (proc.stdout, stage2)):
    assert "on 1 x v4-8 (v4:2x2x1, 4 chips)" in text
    assert "of 32 GiB HBM" in text and "at 40% MFU of a v4 chip's 275" in text
    assert numbers["platform"] == "tpu" and numbers["devices"] == 4
    _assert_printed_equals_analysis(text, numbers)
  assert "trainer=vitvq" in printed_stage1 and "trainer=vim" in proc.stdout


def test_splash_attention_compiles_into_the_tpu_program():
  """attention='auto' picks the Pallas splash kernel on TPU (sequence a multiple of 128): the
  compiled program calls the Mosaic kernel; with 'xla' it does not."""
  from configs import vim_base
  from vim_jax import compile_report, tpu_slices
  devices = tpu_slices.compile_only_devices(tpu_slices.parse("v4-8"))
  config = vim_base.get_config("tiny")
  config.data.source = "tokens"
  config.model.update(dtype="bfloat16", head_dim=128)
  texts = {}
  for kind in ("auto", "xla"):
    config.model.attention = kind
    numbers = compile_report.report(config, devices, tokens_per_image=128, codebook_size=64)
    texts[kind] = numbers["compiled"].as_text()
  assert "tpu_custom_call" in texts["auto"]
  assert "tpu_custom_call" not in texts["xla"]


def test_a_layout_that_cannot_fit_exits_nonzero_saying_so():
  """VIM-Large replicated (data-parallel, no FSDP) at batch 1024 on a v5e-8 (16 GiB chips)."""
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.compile_report", "--config=configs/vim_large.py",
       "--topology=v5e-8", "--config.mesh.data=-1", "--config.mesh.fsdp=1",
       "--config.batch_size=1024", "--tokenizer_config=configs/vitvq_base.py"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=cli_env())
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "error: does not fit" in proc.stderr and "on 1 x v5e-8 (16 GiB per chip)" in proc.stderr
  assert "--config.mesh.fsdp=-1" in proc.stderr  # how to make it fit
