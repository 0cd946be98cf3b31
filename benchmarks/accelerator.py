"""One command that measures an accelerator: the numbers to record the day one is lent.

  python benchmarks/accelerator.py [--json=accelerator.json] [--only=bb,vim,decode]
  python benchmarks/accelerator.py --size=tiny  # CPU-sized, seconds (tests/test_accelerator.py)

On the first device JAX sees (one GPU, or one TPU chip of a host), in under 8 minutes at the
paper sizes on an H100/H200:
  bb      ViT-VQGAN BB with its full objective (L2, logit-Laplace, LPIPS, StyleGAN2 D with lazy
          R1 at its real frequency: its own compiled step every r1_interval steps) at 256 px:
          images/s, model and hardware TFLOP/s, MFU and HFU (vim_jax/infra/flops.py's counts);
  vim     VIM-Base's train step on 1024-token sequences (pre-tokenized, as after
          `vim_jax.tools.pretokenize`): tokens/s, MFU and HFU, once with XLA attention and once
          with the fused kernel 'auto' picks there (cuDNN on GPU, splash on TPU): the
          attention comparison;
  decode  VIM-Base's KV-cached sampler (sample_tokens, the decode loop) against its memory
          floor: the time to read the params and the KV cache once (benchmarks/decode_floor.py).
It prints one markdown table and writes the rows as JSON (--json), section by section, so a
run cut short keeps what it measured. A section that fails prints its error and the others
still run. LPIPS and all weights are random: speed does not depend on them.

MFU and HFU divide by the device's dense bf16 peak (flops.peak_flops_per_second; --peak_tflops
for a device it does not know). On CPU there is none and they are left empty.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from decode_floor import median_time  # noqa: E402

from vim_jax import main as vim_main  # noqa: E402
from vim_jax.infra import flops, prng  # noqa: E402
from vim_jax.models import attention as attention_lib  # noqa: E402
from vim_jax.models import vim as vim_lib  # noqa: E402
from vim_jax.sampling import autoregressive  # noqa: E402
from vim_jax.trainers import compiling, tokenizer_step, vim_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each section runs at. 'paper': the paper's models at their sizes, batches that fill
# little of an 80 GB card; 'tiny': the :tiny configs, for CPU (the test).
SIZES = {
    "paper": dict(
        bb_config="configs/vitvq_base.py",
        bb_batch=16,
        bb_cycles=2,
        vim_config="configs/vim_base.py",
        vim_batch=16,
        vim_steps=10,
        tokens=1024,
        codebook=8192,
        decode_batch=32,
        decode_repeats=2,
    ),
    "tiny": dict(
        bb_config="configs/vitvq_base.py:tiny",
        bb_batch=4,
        bb_cycles=1,
        vim_config="configs/vim_base.py:tiny",
        vim_batch=4,
        vim_steps=2,
        tokens=64,
        codebook=256,
        decode_batch=4,
        decode_repeats=1,
    ),
}
SECTIONS = ("bb", "vim", "decode")


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  return vim_main.load_config_file(os.path.join(ROOT, path) + (f":{variant}" if variant else ""))


def utilisation(step_flops: flops.StepFlops, steps_per_second: float, peak: float | None):
  """Model / hardware TFLOP/s and MFU / HFU (None without a peak)."""
  row = {
      "model_tflops_per_s": step_flops.model * steps_per_second / 1e12,
      "hardware_tflops_per_s": step_flops.hardware * steps_per_second / 1e12,
      "mfu": None,
      "hfu": None,
  }
  if peak:
    row["mfu"] = step_flops.model * steps_per_second / peak
    row["hfu"] = step_flops.hardware * steps_per_second / peak
  return row


def timed_steps(run_step, state, count: int):
  """(state, seconds) for `count` calls of run_step(i, state) -> (state, metrics), after the
  caller's warm-up; waits for the last step's results."""
  metrics = None
  start = time.perf_counter()
  for i in range(count):
    state, metrics = run_step(i, state)
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def bench_bb(size: dict, peak) -> list[dict]:
  """BB's full objective: the regular and the R1 step, timed over whole R1 cycles."""
  config = load_config(size["bb_config"])
  config.update(batch_size=size["bb_batch"], perceptual_weights="")
  config.loss.perceptual = 0.1
  models = tokenizer_step.build_models(config)  # LPIPS with random weights (perceptual > 0)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(config)
  s = config.image_size
  images = jax.random.uniform(jax.random.key(1), (config.batch_size, s, s, 3), minval=-1, maxval=1)
  lpips_params = jax.jit(models.lpips.init)(jax.random.key(2), images[:1], images[:1])["params"]
  state = nn.meta.unbox(
      jax.jit(tokenizer_step.make_init_fn(models, tx, disc_tx, config, 1))(jax.random.key(0))
  )
  compiled, counted = {}, {}
  start = time.perf_counter()
  for with_r1, fn in tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, config).items():
    compiled[with_r1], counted[with_r1] = compiling.compile_step(
        jax.jit(fn, donate_argnums=(0,)), state, {"image": images}, lpips_params
    )
  compile_seconds = time.perf_counter() - start
  interval = tokenizer_step.r1_interval(config)
  mean = flops.mean_over_cycle(counted[False], counted[True], interval)
  run = lambda i, st: compiled[tokenizer_step.is_r1_step(config, i)](
      st, {"image": images}, lpips_params
  )
  state, _ = timed_steps(run, state, interval)  # one cycle to warm up
  steps = interval * size["bb_cycles"]
  state, seconds = timed_steps(run, state, steps)
  row = {
      "section": "bb",
      "what": f"ViT-VQGAN BB full objective, {s} px, batch "
      f"{config.batch_size}, R1 every {interval} steps",
      "step_ms": 1e3 * seconds / steps,
      "images_per_s": config.batch_size * steps / seconds,
      "model_gflop_per_step": mean.model / 1e9,
      "hardware_gflop_per_step": mean.hardware / 1e9,
      "r1_step_gflop": counted[True].model / 1e9,
      "compile_s": compile_seconds,
  }
  row.update(utilisation(mean, steps / seconds, peak))
  return [row]


def _vim_variants(platform: str):
  """(attention, dropout_rng) pairs the vim section times: XLA attention, the fused kernel
  'auto' picks, and that kernel with the dropout PRNG 'auto' does not pick here (rbg off TPU,
  threefry on TPU): what config.dropout_rng changes."""
  other_rng = "threefry" if platform == "tpu" else "rbg"
  return (("xla", "auto"), ("auto", "auto"), ("auto", other_rng))


def bench_vim(size: dict, peak) -> list[dict]:
  """VIM-Base's train step on token sequences: XLA attention against the fused kernel, and
  the dropout PRNG."""
  rows = []
  rng = np.random.default_rng(0)
  batch = {
      "tokens": jnp.asarray(
          rng.integers(0, size["codebook"], (size["vim_batch"], size["tokens"])), jnp.int32
      ),
      "label": jnp.asarray(rng.integers(0, 10, (size["vim_batch"],)), jnp.int32),
  }
  platform = jax.devices()[0].platform
  for attention, dropout_rng in _vim_variants(platform):
    config = load_config(size["vim_config"])
    config.update(batch_size=size["vim_batch"])
    config.data.source = "tokens"
    config.model.attention = attention
    config.dropout_rng = dropout_rng
    model = vim_lib.VIM.from_config(config, size["codebook"], size["tokens"])
    kind = _attention_kind(model)
    if attention == "auto" and kind == "xla" and dropout_rng == "auto":
      continue  # no fused kernel here (CPU): the xla row is that
    tx, schedule = vim_step.build_optimizer(config)
    params = nn.meta.unbox(
        jax.jit(model.init)(jax.random.key(0), batch["tokens"][:1], batch["label"][:1])
    )["params"]
    state = vim_step.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )
    start = time.perf_counter()
    step, counted = compiling.compile_step(
        jax.jit(vim_step.make_train_step(model, None, tx, schedule, config), donate_argnums=(0,)),
        state,
        batch,
        {},
    )
    compile_seconds = time.perf_counter() - start
    run = lambda i, st, step=step: step(st, batch, {})
    state, _ = timed_steps(run, state, 1)
    state, seconds = timed_steps(run, state, size["vim_steps"])
    steps_per_second = size["vim_steps"] / seconds
    rng_impl = prng.impl_for(dropout_rng, platform)
    row = {
        "section": "vim",
        "what": f"VIM-Base train step, {size['tokens']} tokens, batch "
        f"{config.batch_size}, attention {kind}, dropout {rng_impl}",
        "attention": kind,
        "dropout_rng": rng_impl,
        "step_ms": 1e3 / steps_per_second,
        "tokens_per_s": steps_per_second * config.batch_size * size["tokens"],
        "model_gflop_per_step": counted.model / 1e9,
        "hardware_gflop_per_step": counted.hardware / 1e9,
        "compile_s": compile_seconds,
    }
    row.update(utilisation(counted, steps_per_second, peak))
    rows.append(row)
  return rows


def _attention_kind(model) -> str:
  return attention_lib.resolve(model.stack.attention, model.dtype, length=model.num_tokens)


def bench_decode(size: dict, peak) -> list[dict]:
  """sample_tokens' time per token against its floor, the params and the KV cache read once:
  measured (a sum over every element) and at the device's published HBM bandwidth. With the
  params as trained (float32) and cast once to the compute dtype (bfloat16)."""
  del peak
  config = load_config(size["vim_config"])
  model = vim_lib.VIM.from_config(config, size["codebook"], size["tokens"])
  labels = jnp.arange(size["decode_batch"], dtype=jnp.int32) % 10
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size["tokens"]), jnp.int32), labels[:1])
  )["params"]
  model, params = autoregressive.decoding_layout(model, params)  # as the Sampler holds them
  cache = autoregressive.init_cache(model, size["decode_batch"])
  bandwidth = flops.hbm_bytes_per_second(jax.devices()[0])
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  sample = jax.jit(lambda p, l, r: autoregressive.sample_tokens(model, p, l, r))
  read_once = jax.jit(lambda tree: [jnp.sum(x) for x in jax.tree.leaves(tree)])
  rows = []
  dtypes = ["float32"] + ([model.dtype.name] if model.dtype.name != "float32" else [])
  for params_dtype in dtypes:  # the tiny configs compute in float32: one row
    params = jax.tree.map(lambda x: x.astype(params_dtype), params)
    per_token = (
        median_time(sample, params, labels, jax.random.key(1), repeats=size["decode_repeats"])
        / size["tokens"]
    )
    floor = median_time(read_once, (params, cache), repeats=10)
    read = nbytes(params) + nbytes(cache)
    row = {
        "section": "decode",
        "what": f"VIM-Base KV-cached decode, batch "
        f"{size['decode_batch']}, {size['tokens']} tokens, params {params_dtype}",
        "params_dtype": params_dtype,
        "step_ms": per_token * 1e3,
        "floor_ms": floor * 1e3,
        "floor_ratio": per_token / floor,
        "tokens_per_s": size["decode_batch"] / per_token,
        "params_mb": nbytes(params) / 1e6,
        "cache_mb": nbytes(cache) / 1e6,
        "floor_gb_per_s": read / floor / 1e9,
        "spec_floor_ms": None,
        "spec_floor_ratio": None,
    }
    if bandwidth:
      row["spec_floor_ms"] = read / bandwidth * 1e3
      row["spec_floor_ratio"] = per_token / (read / bandwidth)
    rows.append(row)
  return rows


BENCHES = {"bb": bench_bb, "vim": bench_vim, "decode": bench_decode}


def format_row(row: dict) -> str:
  pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
  if "error" in row:
    return f"| {row['section']} | failed: {row['error'][:150]} | | | | | |"
  if row["section"] == "decode":
    spec = (
        ""
        if row["spec_floor_ms"] is None
        else f"; at the published HBM bandwidth {row['spec_floor_ms']:.3f} ms: "
        f"**{row['spec_floor_ratio']:.2f}x**"
    )
    return (
        f"| {row['what']} | {row['step_ms']:.3f} ms/token | {row['tokens_per_s']:,.0f} "
        f"tokens/s | floor as measured {row['floor_ms']:.3f} ms "
        f"({row['floor_gb_per_s']:,.0f} GB/s): {row['floor_ratio']:.2f}x{spec} | | | |"
    )
  rate = (
      f"{row['images_per_s']:,.1f} img/s"
      if "images_per_s" in row
      else f"{row['tokens_per_s']:,.0f} tokens/s"
  )
  return (
      f"| {row['what']} | {row['step_ms']:.1f} ms/step | {rate} | "
      f"{row['model_tflops_per_s']:.3g} / {row['hardware_tflops_per_s']:.3g} | "
      f"**{pct(row['mfu'])}** | {pct(row['hfu'])} | {row['compile_s']:.0f} s |"
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="paper")
  parser.add_argument(
      "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}"
  )
  parser.add_argument("--json", default="accelerator.json", help="where the rows are written")
  parser.add_argument(
      "--peak_tflops",
      type=float,
      default=0.0,
      help="the device's dense bf16 peak TFLOP/s when infra/flops.py does not know it",
  )
  args = parser.parse_args(argv)
  sections = [s.strip() for s in args.only.split(",") if s.strip()]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(
        f"--only={args.only}: unknown section {unknown[0]!r}; expected a subset of "
        f"{','.join(SECTIONS)}"
    )
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 or flops.peak_flops_per_second(device)
  header = {
      "date": datetime.date.today().isoformat(),
      "device": device.device_kind,
      "platform": device.platform,
      "jax": jax.__version__,
      "size": args.size,
      "peak_tflops": peak / 1e12 if peak else None,
  }
  print(
      f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, peak "
      f"{f'{peak / 1e12:.0f} bf16 TFLOP/s' if peak else 'unknown (no MFU)'}, "
      f"sizes '{args.size}'",
      flush=True,
  )
  rows = []
  for section in sections:
    start = time.perf_counter()
    try:
      new = BENCHES[section](SIZES[args.size], peak)
    except Exception as e:  # pylint: disable=broad-except; the other sections still run
      traceback.print_exc()
      new = [{"section": section, "error": f"{type(e).__name__}: {e}"}]
    for row in new:
      row["section_s"] = time.perf_counter() - start
      print(format_row(row), flush=True)
    rows.extend(new)
    with open(args.json, "w") as f:
      json.dump({**header, "rows": rows}, f, indent=1)
  print()
  print(
      f"{header['date']}, {device.device_kind}, jax {jax.__version__}, "
      f"`python benchmarks/accelerator.py --size={args.size}`:"
  )
  print()
  print("| measurement | time | rate | model / hardware TFLOP/s | MFU | HFU | compile |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(format_row(row))
  return rows


if __name__ == "__main__":
  main()
