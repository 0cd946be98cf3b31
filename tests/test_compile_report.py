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
  from vim_jax.trainers import step_report

  config = vim_base.get_config("tiny")
  config.update(batch_size=8)
  config.data.source = "tokens"  # no tokenizer: tokens_per_image and codebook_size give shapes
  config.mesh.update(data=8, fsdp=1, tensor=1)
  replicated = step_report.report(config, tokens_per_image=64, codebook_size=512)
  config.mesh.update(data=1, fsdp=8, tensor=1)
  fsdp = step_report.report(config, tokens_per_image=64, codebook_size=512)
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
      [
          sys.executable,
          "-m",
          "vim_jax.compile_report",
          "--config=configs/vitvq_base.py:tiny",
          "--config.loss.perceptual=0.1",
          "--config.perceptual_weights=/nonexistent",
          "--num_cpu_devices=8",
          "--config.batch_size=32",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
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
  from vim_jax.infra import tpu_slices

  expected = {
      "v4-8": (4, "v4:2x2x1"),
      "v4-32": (16, "v4:2x2x4"),
      "v4-128": (64, "v4:4x4x4"),
      "v4-256": (128, "v4:4x4x8"),
      "v5p-64": (32, "v5p:2x4x4"),
      "v5e-8": (8, "v5e:2x4"),
      "v5litepod-16": (16, "v5e:4x4"),
      "v6e-64": (64, "v6e:8x8"),
      "v5e-1": (1, "v5e:1x1"),
  }
  for name, (chips, topology) in expected.items():
    spec = tpu_slices.parse(name)
    assert (spec.chips, spec.topology) == (chips, topology), name
  for bad in ("v4-4", "v4-12", "v3-8", "tpu-8", "v5e-6"):
    with pytest.raises(ValueError, match=f"--topology='{bad}'.*v4-N or v5p-N"):
      tpu_slices.parse(bad)


def _printed(text: str) -> dict[str, float]:
  """The numbers compile_report prints: GiB per chip and TFLOP per step."""
  memory = next(line for line in text.splitlines() if line.startswith("per "))  # the step's
  found = {
      k: float(v)
      for k, v in re.findall(r"(arguments|outputs|temporaries|aliased|total) ([0-9.]+) GiB", memory)
  }
  found["tflop"] = float(re.search(r"per step: ([0-9.e-]+) TFLOP model", text).group(1))
  found["hardware_tflop"] = float(re.search(r", ([0-9.e-]+) TFLOP hardware", text).group(1))
  found["xla_tflop"] = float(
      re.search(r"cost analysis of the step: ([0-9.e-]+) TFLOP", text).group(1)
  )
  return found


def _assert_printed_equals_analysis(text, numbers):
  """What the CLI printed equals the compiled program's own memory and cost analyses (to the
  printed precision) and the FLOPs counted from the jaxpr."""
  compiled = numbers["compiled"]
  m = compiled.memory_analysis()
  printed = _printed(text)
  gib = lambda b: b / 2**30
  for name, value in (
      ("arguments", m.argument_size_in_bytes),
      ("outputs", m.output_size_in_bytes),
      ("temporaries", m.temp_size_in_bytes),
      ("aliased", m.alias_size_in_bytes),
      (
          "total",
          m.argument_size_in_bytes
          + m.output_size_in_bytes
          + m.temp_size_in_bytes
          - m.alias_size_in_bytes,
      ),
  ):
    assert printed[name] == pytest.approx(gib(value), abs=6e-4), name
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert printed["xla_tflop"] == pytest.approx(cost["flops"] / 1e12, rel=1e-5)
  assert printed["tflop"] == pytest.approx(numbers["flops_per_device"] / 1e12, rel=1e-5)
  assert printed["hardware_tflop"] == pytest.approx(numbers["flops"].hardware / 1e12, rel=1e-5)
  assert 0 < numbers["flops"].model <= numbers["flops"].hardware


README_COMPILE_REPORT = readme_commands.find("python -m vim_jax.compile_report")
# The README's command at tiny size on the smallest v4 slice (a v4-128 compiles for minutes).
README_TINY_EDITS = (
    ("configs/vim_large.py", "configs/vim_large.py:tiny"),
    ("configs/vitvq_base.py", "configs/vitvq_base.py:tiny"),
    ("--topology=v4-128", "--topology=v4-8"),
)


def test_tiny_configs_compile_for_a_v4_8_and_print_the_compiled_analysis(capsys):
  """Stage 1 with LPIPS and the GAN, and stage 2 tokenizing images inside its step, compiled
  for a v4-8: what the report prints equals the compiled program's analyses. Stage 2 goes
  through the README's compile_report command (read from README.md, :tiny on a v4-8, from the
  repository root), and the same config compiled here gives the analysis it printed (the TPU
  compiler is deterministic); stage 1 is compiled once, here, and printed as the CLI prints
  (its CLI path: test_cli_reports_a_stage1_config_without_weights_or_data)."""
  from configs import vim_large, vitvq_base
  from vim_jax.infra import tpu_slices
  from vim_jax.trainers import step_report

  spec = tpu_slices.parse("v4-8")
  devices = tpu_slices.compile_only_devices(spec)
  stage1 = vitvq_base.get_config("tiny")
  stage1.update(perceptual_weights="/nonexistent")  # shapes only: no file is read
  stage1.loss.perceptual = 0.1
  proc = subprocess.run(
      readme_commands.to_argv(README_COMPILE_REPORT, {}, README_TINY_EDITS),
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  capsys.readouterr()
  numbers = stage1_numbers = step_report.report(
      stage1, devices, capacity_bytes=spec.generation.hbm_bytes
  )
  step_report.print_report(stage1, numbers, spec)
  printed_stage1 = capsys.readouterr().out
  stage2 = step_report.report(
      vim_large.get_config("tiny"),
      devices,
      capacity_bytes=spec.generation.hbm_bytes,
      tokenizer_config=vitvq_base.get_config("tiny"),
  )
  for text, numbers in ((printed_stage1, numbers), (proc.stdout, stage2)):
    assert "on 1 x v4-8 (v4:2x2x1, 4 chips)" in text
    assert "of 32 GiB HBM" in text and "at 40% MFU of a v4 chip's 275" in text
    assert numbers["platform"] == "tpu" and numbers["devices"] == 4
    _assert_printed_equals_analysis(text, numbers)
  assert "trainer=tokenizer" in printed_stage1 and "trainer=vim" in proc.stdout
  # Lazy R1 is its own program: its memory line equals its analysis; the FLOPs are the mean
  # per step over the R1 cycle, between the regular step's and the R1 step's.
  numbers = stage1_numbers
  r1, m = numbers["r1"], numbers["r1"]["compiled"].memory_analysis()
  r1_line = next(l for l in printed_stage1.splitlines() if l.startswith("the R1 step"))
  assert "(every 4 steps)" in r1_line
  assert f"temporaries {m.temp_size_in_bytes / 2**30:.3f} GiB" in r1_line
  assert numbers["peak_bytes"] == max(numbers["total_bytes"], r1["total_bytes"])
  assert r1["flops"].model > numbers["flops"].model
  assert "r1" not in stage2


def test_splash_attention_compiles_into_the_tpu_program():
  """attention='auto' picks the Pallas splash kernel on TPU (sequence a multiple of 128): the
  compiled program calls the Mosaic kernel; with 'xla' it does not."""
  from configs import vim_base
  from vim_jax.infra import tpu_slices
  from vim_jax.trainers import step_report

  devices = tpu_slices.compile_only_devices(tpu_slices.parse("v4-8"))
  config = vim_base.get_config("tiny")
  config.data.source = "tokens"
  config.model.update(dtype="bfloat16", head_dim=128)
  texts = {}
  for kind in ("auto", "xla"):
    config.model.attention = kind
    numbers = step_report.report(config, devices, tokens_per_image=128, codebook_size=64)
    texts[kind] = numbers["compiled"].as_text()
  assert "tpu_custom_call" in texts["auto"]
  assert "tpu_custom_call" not in texts["xla"]


def test_a_layout_that_cannot_fit_exits_nonzero_saying_so():
  """VIM-Large replicated (data-parallel, no FSDP) at batch 1024 on a v5e-8 (16 GiB chips)."""
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.compile_report",
          "--config=configs/vim_large.py",
          "--topology=v5e-8",
          "--config.mesh.data=-1",
          "--config.mesh.fsdp=1",
          "--config.batch_size=1024",
          "--tokenizer_config=configs/vitvq_base.py",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=cli_env(),
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "error: does not fit" in proc.stderr and "on 1 x v5e-8 (16 GiB per chip)" in proc.stderr
  assert "--config.mesh.fsdp=-1" in proc.stderr  # how to make it fit


# --- The sampler (--program=sample) -----------------------------------------------------------


def test_decode_step_is_the_samplers_loop_body():
  """N calls of the step the report compiles draw sample_tokens' tokens (guidance, top-k)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from configs import vim_base
  from vim_jax.models import vim as vim_lib
  from vim_jax.sampling import autoregressive

  config = vim_base.get_config("tiny")
  model = vim_lib.VIM.from_config(config, vocab_size=32, num_tokens=16)
  labels = jnp.array([0, 3, 5], jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), labels[:1]))[
      "params"
  ]
  sampling = autoregressive.SamplingConfig(temperature=1.0, top_k=8, guidance_scale=2.0)
  rng = jax.random.key(7)
  expected = autoregressive.sample_tokens(model, params, labels, rng, sampling)
  unrolled, params = autoregressive.decoding_layout(model, params)
  step = jax.jit(autoregressive.make_decode_step(unrolled, sampling))
  rows = jnp.stack([labels, jnp.full_like(labels, model.null_label)], 1).reshape(-1)
  cache, previous = autoregressive.init_cache(unrolled, 6), jnp.zeros((6,), jnp.int32)
  tokens = jnp.zeros((3, 16), jnp.int32)
  for index in range(16):
    cache, previous, tokens = step(params, cache, previous, rows, tokens, jnp.int32(index), rng)
  assert (tokens == expected).all()


def _tiny_stage2(guidance_scale: float):
  from configs import vim_base, vitvq_base

  config = vim_base.get_config("tiny")
  config.sampling.guidance_scale = guidance_scale
  return config, vitvq_base.get_config("tiny")


def test_sampler_report_equals_its_closed_forms_on_8_cpu_devices():
  """Guided sampling of 16 images on 8 devices: 32 sequences, 4 per device. The decode loop
  carries the params (replicated) and one device's share of the KV cache (the CPU pads
  nothing), writes one position of each layer's K and V a step and copies none; XLA's bytes
  accessed for the step hold that floor, within a small factor; the 50k estimate is the
  formula."""
  import jax

  from vim_jax.infra import tpu_slices
  from vim_jax.sampling import sampler_report

  config, tokenizer = _tiny_stage2(guidance_scale=2.0)
  numbers = sampler_report.sample_report(
      config, jax.devices()[:8], batch_size=16, tokenizer_config=tokenizer
  )
  m, tokens = config.model, numbers["num_tokens"]
  assert (numbers["rows"], numbers["devices"], numbers["guided"]) == (32, 8, True)
  assert numbers["params_bytes"] == 4 * numbers["params"]  # float32, every param on each device
  # keys and values, every layer, 4 sequences, every position, float32 (the tiny compute dtype)
  cache = 2 * m.num_layers * 4 * m.num_heads * m.head_dim * tokens * 4
  assert numbers["cache_bytes"] == cache
  assert numbers["model_floor_bytes"] == numbers["params_bytes"] + cache
  assert numbers["loop_cache_bytes"] == cache
  floor = numbers["loop_bytes"]  # + the tokens, the labels, the key and the counter
  assert numbers["model_floor_bytes"] < floor < numbers["model_floor_bytes"] + 4096
  assert numbers["cache_writes"] == {"updates": 2 * m.num_layers, "full": 0}
  assert floor <= numbers["xla_step_bytes"] < 3 * floor
  assert numbers["argument_bytes"] >= numbers["params_bytes"]
  assert numbers["step_flops"] > 2 * numbers["params"] * 4 * 0.5  # the matmuls of 4 sequences
  v4 = tpu_slices.GENERATIONS["v4"]
  estimate = sampler_report.sampling_estimate(numbers, v4, num_samples=50_000)
  batches = -(-50_000 // 16)
  decode = batches * tokens * floor / 1228e9
  decoder = batches * numbers["decoder_flops"] / (0.4 * 275e12)
  assert estimate["batches"] == batches == 3125
  assert estimate["floor_seconds"] == pytest.approx(decode + decoder, rel=1e-12)
  assert estimate["measured_seconds"] == pytest.approx(1.42 * decode + decoder, rel=1e-12)
  unguided = sampler_report.sample_report(
      _tiny_stage2(1.0)[0], jax.devices()[:8], tokenizer_config=tokenizer
  )
  # the default batch: config.sampling.batch_size (8) sequences per device, one per image
  assert (unguided["batch_size"], unguided["rows"]) == (64, 64)
  assert unguided["cache_bytes"] == 2 * cache


def test_the_decode_loop_state_is_read_in_the_tpus_tiled_layout():
  """A TPU pads the dims a tile covers: a [32 sequences, 32 heads, 64, 1024 positions] bf16
  cache with head_dim minor-most takes 128 lanes per head (twice its size); with the batch
  minor-most (128 sequences) nothing is padded. The decode loop is the largest while loop."""
  from vim_jax.infra import hlo_stats

  mib, size = 2**20, hlo_stats.array_bytes
  assert size("bf16", (32, 32, 64, 1024), (2, 0, 1, 3), (8, 128)) == 256 * mib
  assert size("bf16", (128, 16, 96, 1024), (0, 2, 1, 3), (8, 128)) == 384 * mib
  assert size("bf16", (1, 1, 2048), (2, 1, 0), (2, 128)) == 2 * 2048 * 2
  assert size("f32", (3, 5)) == 60  # no tiles (CPU): as stored
  hlo = (
      "  %while.1 = (s32[]{:T(128)}, bf16[32,32,64,1024]{2,0,1,3:T(8,128)(2,1)}, "
      "bf16[2048,8192]{1,0:T(8,128)(2,1)S(3)}) while(%tuple.1), condition=%c, body=%b\n"
      "  %while.2 = (s32[]{:T(128)}, f32[1000]{0:T(1024)}) while(%tuple.2), body=%b2\n"
  )
  assert hlo_stats.largest_loop_state(hlo, (32, 32, 64, 1024)) == {
      "bytes": 4 + 256 * mib + 32 * mib,
      "cache_bytes": 256 * mib,
  }


def test_sampler_report_refuses_a_batch_the_chips_cannot_split():
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.compile_report",
          "--program=sample",
          "--config=configs/vim_base.py:tiny",
          "--tokenizer_config=configs/vitvq_base.py:tiny",
          "--num_cpu_devices=8",
          "--sample_batch_size=12",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=cli_env(),
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert (
      "error: --sample_batch_size=12: the sampler splits each batch evenly over the 8 chips; "
      "use a positive multiple of 8 (e.g. 8)"
  ) in proc.stderr
  assert "Traceback" not in proc.stderr


def test_sampler_compiles_for_a_v4_8_and_prints_the_estimate():
  """The CLI on a v4-8 (4 chips), guided: 16 sequences, 4 per chip, within the chip's HBM;
  the decode step moves nothing between chips (each image's class and null rows sit side by
  side on one chip; as halves [classes; nulls] they made 8-10 collective-permutes a step); the
  wall-time line is the formula on the numbers it printed."""
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.compile_report",
          "--program=sample",
          "--config=configs/vim_base.py:tiny",
          "--tokenizer_config=configs/vitvq_base.py:tiny",
          "--topology=v4-8",
          "--sample_batch_size=8",
          "--config.sampling.guidance_scale=2",
          "--num_samples=500000000",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  assert "global batch 8 images (guidance 2: 16 sequences decoded, 4 per chip)" in text
  assert "data-parallel on v4-8 (v4:2x2x1, 4 chips)" in text and "of 32 GiB HBM (0%)" in text
  assert "collectives: none" in text, text
  floor = float(re.search(r"read once a step, ([0-9.e-]+) GB", text).group(1)) * 1e9
  step_ms = float(re.search(r"HBM\): ([0-9.e-]+) ms", text).group(1))
  assert step_ms == pytest.approx(floor / 1228e9 * 1e3, rel=1e-3)
  minutes = re.search(
      r"500,000,000 samples: 62500000 batches x 64 decode steps: ([0-9.,]+) min at "
      r"the floor, ([0-9.,]+) min at 1.42x it",
      text,
  )
  assert minutes, text
  floor_minutes = 62_500_000 * 64 * floor / 1228e9 / 60
  assert float(minutes.group(1)) == pytest.approx(floor_minutes, rel=3e-3)
  assert float(minutes.group(2)) == pytest.approx(1.42 * floor_minutes, rel=3e-3)
