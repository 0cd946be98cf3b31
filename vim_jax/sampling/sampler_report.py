"""What a VIM config's sampler needs on a TPU slice (or any mesh): per-chip memory of the whole
sampler, one decode step's bytes and FLOPs beside its memory floor, and the wall time of 50k
samples. `python -m vim_jax.compile_report --program=sample` prints it.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.infra import flops, hlo_stats, parallel, runs
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.sampling import autoregressive
from vim_jax.trainers import compiling, step_report, vim_step

# The sampler's time per token over its memory floor (the time to read the params and the KV
# cache once), measured on CPU for the scanned layout by benchmarks/decode_floor.py (see
# benchmarks/RESULTS.md). The 50k-sample estimate is given at the floor and at this ratio.
MEASURED_FLOOR_RATIO = 1.42


DECODER_MFU = 0.4  # the tokenizer's decoder is a ViT over 1024 tokens: compute-bound


def _decoding_model_and_params(model, params):
  """(VIM unrolled for decoding, its params' shapes) from the scanned ones, as the sampler
  converts them once (autoregressive.decoding_layout) and then holds only the unrolled copy."""

  converted = {}

  def convert(p):  # decoding_layout slices arrays: run it on shapes under eval_shape
    converted["model"], p = autoregressive.decoding_layout(model, p)
    return p

  shapes = jax.eval_shape(convert, params)
  return converted["model"], shapes


def check_sample_batch(batch_size: int, chips: int):
  """The sampler splits a batch evenly over the chips (generation.Sampler)."""
  if batch_size < 1 or batch_size % chips:
    raise ValueError(
        f"--sample_batch_size={batch_size}: the sampler splits each batch evenly "
        f"over the {chips} chips; use a positive multiple of {chips} (e.g. "
        f"{max(chips, batch_size // chips * chips)})."
    )


def sample_report(
    config,
    devices=None,
    batch_size: int = 0,
    tokenizer_config=None,
    capacity_bytes: int | None = None,
) -> dict:
  """Compiles the sampler generation.Sampler runs (data-parallel over `devices`, params
  replicated, the batch split over the chips) for one batch of `batch_size` images (0:
  vim_step.sampling_batch_size(config, chips)), and one of its decode steps on its own.

  Returns per-chip numbers: the whole sampler's memory (1024 KV-cached decode steps, then the
  tokenizer's decoder on the token grids), the decode step's XLA cost (bytes accessed, FLOPs)
  beside its floor (params + KV cache bytes per chip), and the decoder's FLOPs per batch.
  The tokenizer holds its quantizer and decoder only (what decoding reads).
  """

  if config.trainer != "vim":
    raise ValueError(
        f"--program=sample compiles a stage-2 (VIM) config's sampler; "
        f"config.trainer={config.trainer!r}."
    )
  tok_model = step_report.tokenizer_model(config, tokenizer_config, for_sampling=True)
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1), devices)  # as Sampler's
  chips = parallel.data_parallel_size(mesh)
  batch_size = batch_size or vim_step.sampling_batch_size(config, chips)
  check_sample_batch(batch_size, chips)
  sampling = vim_step.sampling_config_from(config)
  model = vim_step.build_model(config, tok_model)
  guided = vim_step.guided(config)
  rows = batch_size * (2 if guided else 1)  # sequences decoded at once

  replicated = NamedSharding(mesh, P())
  batched = parallel.batch_sharding(mesh)
  shaped = lambda tree, sharding: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )
  model, params = _decoding_model_and_params(model, runs.vim_param_shapes(model))
  params = shaped(params, replicated)
  tok_params = {k: v for k, v in runs.tokenizer_param_shapes(tok_model).items() if k != "encoder"}
  tok_params = shaped(tok_params, replicated)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  int_spec = lambda shape, sharding: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

  start = time.perf_counter()
  sample = jax.jit(
      vim_step.make_sample_fn(model, tok_model, sampling),
      in_shardings=(replicated, replicated, batched, replicated),
  )
  compiled, _ = step_report.compile_or_does_not_fit(
      sample, params, tok_params, int_spec((batch_size,), batched), key
  )
  numbers = step_report.memory_numbers(compiled)
  if capacity_bytes and numbers.get("total_bytes", 0) > capacity_bytes:
    raise step_report.DoesNotFit(
        f"the sampler needs {numbers['total_bytes'] / 2**30:.2f} GiB per chip"
    )
  cache = shaped(jax.eval_shape(lambda: autoregressive.init_cache(model, rows)), batched)
  chip_cache_shape = (rows // chips, *jax.tree.leaves(cache)[0].shape[1:])  # one layer's K
  sampler_hlo = compiled.as_text()
  loop = hlo_stats.largest_loop_state(sampler_hlo, chip_cache_shape)
  numbers.update(
      loop_bytes=loop["bytes"],
      loop_cache_bytes=loop["cache_bytes"],
      cache_writes=hlo_stats.buffer_writes_in_loops(sampler_hlo, chip_cache_shape),
  )

  step = jax.jit(
      autoregressive.make_decode_step(model, sampling),
      in_shardings=(replicated, batched, batched, batched, batched, replicated, replicated),
      donate_argnums=(1, 4),
  )
  step_compiled, step_flops = step_report.compile_or_does_not_fit(
      step,
      params,
      cache,
      int_spec((rows,), batched),
      int_spec((rows,), batched),
      int_spec((batch_size, model.num_tokens), batched),
      int_spec((), replicated),
      key,
  )
  cost = step_report.xla_cost(step_compiled)
  grid = jax.ShapeDtypeStruct((batch_size // chips, *tok_model.grid), jnp.int32)
  decoder_flops = flops.step_flops(
      lambda p, g: tok_model.apply(
          {"params": p}, g, method=tokenizer_lib.ViTVQGAN.decode_from_indices
      ),
      shaped(tok_params, None),
      grid,
  )
  numbers.update(
      {
          "mesh": dict(mesh.shape),
          "devices": chips,
          "platform": step_report.mesh_platform(mesh),
          "batch_size": batch_size,
          "rows": rows,
          "guided": guided,
          "guidance_scale": sampling.guidance_scale,
          "num_tokens": model.num_tokens,
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "decoder_params": int(sum(x.size for x in jax.tree.leaves(tok_params["decoder"]))),
          "params_bytes": step_report.tree_bytes(params),
          "cache_bytes": step_report.tree_bytes(cache) // chips,
          "step_flops": step_flops.hardware,
          "xla_step_flops": float(cost.get("flops", float("nan"))),
          "xla_step_bytes": float(cost.get("bytes accessed", float("nan"))),
          "decoder_flops": decoder_flops,
          "compile_seconds": time.perf_counter() - start,
          "compiled": compiled,
          "step_compiled": step_compiled,
          "step_collectives": step_report.count_collectives(step_compiled.as_text()),
          "summary": compiling.describe_memory(compiled, "sampler"),
      }
  )
  numbers["model_floor_bytes"] = numbers["params_bytes"] + numbers["cache_bytes"]
  return numbers


def sampling_estimate(
    numbers: dict,
    generation,
    num_samples: int = 50_000,
    floor_ratio: float = MEASURED_FLOOR_RATIO,
    decoder_mfu: float = DECODER_MFU,
) -> dict:
  """Wall time of `num_samples` images from sample_report's numbers on chips of `generation`
  (tpu_slices.Generation): ceil(num_samples / batch) batches, each N decode steps and the
  decoder. A decode step reads the decode loop's state (loop_bytes per chip) through HBM: at
  its bandwidth (the floor) and floor_ratio times that (the sampler's measured ratio to its
  floor); the decoder runs at decoder_mfu of the chip's peak. Seconds."""
  batches = math.ceil(num_samples / numbers["batch_size"])
  step = numbers["loop_bytes"] / generation.hbm_bytes_per_second
  decode = batches * numbers["num_tokens"] * step
  decoder = batches * numbers["decoder_flops"] / (decoder_mfu * generation.peak_bf16_flops)
  return {
      "batches": batches,
      "step_seconds": step,
      "decode_seconds": decode,
      "decoder_seconds": decoder,
      "floor_seconds": decode + decoder,
      "measured_seconds": floor_ratio * decode + decoder,
      "floor_ratio": floor_ratio,
      "step_compute_seconds": numbers["step_flops"] / generation.peak_bf16_flops,
  }


def print_sample_report(numbers: dict, spec=None, num_samples: int = 50_000):
  gib = lambda key: numbers.get(key, float("nan")) / 2**30
  gb = lambda b: f"{b / 1e9:.4g} GB"
  where = (
      f"{spec.name} ({spec.topology}, {spec.chips} chips)"
      if spec
      else f"{numbers['devices']} x {numbers['platform']}"
  )
  unit = "chip" if spec else "device"
  per = numbers["rows"] // numbers["devices"]
  guidance = (
      f"guidance {numbers['guidance_scale']:g}: {numbers['rows']} sequences decoded, "
      if numbers["guided"]
      else "no guidance: "
  )
  print(
      f"sampler: VIM {numbers['params'] / 1e6:.1f}M params (unrolled for decoding) and the "
      f"tokenizer's decoder ({numbers['decoder_params'] / 1e6:.1f}M); global batch "
      f"{numbers['batch_size']} images ({guidance}{per} per {unit}), data-parallel on {where}, "
      f"params replicated; compiled in {numbers['compile_seconds']:.0f} s"
  )
  capacity = (
      f" of {spec.generation.hbm_bytes / 2**30:.0f} GiB HBM "
      f"({100 * numbers['total_bytes'] / spec.generation.hbm_bytes:.0f}%)"
      if spec and "total_bytes" in numbers
      else ""
  )
  print(
      f"per {unit}, the whole sampler ({numbers['num_tokens']} decode steps, then the "
      f"decoder): arguments {gib('argument_bytes'):.3f} GiB, outputs {gib('output_bytes'):.3f} "
      f"GiB, temporaries {gib('temp_bytes'):.3f} GiB, aliased {gib('alias_bytes'):.3f} GiB, "
      f"total {gib('total_bytes'):.3f} GiB{capacity}"
  )
  writes = numbers["cache_writes"]
  rest = numbers["loop_bytes"] - numbers["loop_cache_bytes"]
  print(
      f"decode step floor per {unit}: the decode loop's state as compiled, read once a step, "
      f"{gb(numbers['loop_bytes'])}: KV cache {gb(numbers['loop_cache_bytes'])} as laid out, "
      f"params as the loop reads them and the rest {gb(rest)} "
      f"(from the model: params {gb(numbers['params_bytes'])} as stored + KV cache "
      f"{gb(numbers['cache_bytes'])} = {gb(numbers['model_floor_bytes'])}); the loop writes "
      f"the cache {writes['updates']} times a step in place and copies it {writes['full']} times"
  )
  collectives = (
      ", ".join(f"{op} {n}" for op, n in numbers["step_collectives"].items() if n) or "none"
  )
  ratio = numbers["xla_step_bytes"] / numbers["loop_bytes"]
  print(
      f"decode step compiled alone, per {unit}: XLA's bytes accessed "
      f"{gb(numbers['xla_step_bytes'])} ({ratio:.2f}x the floor), "
      f"{numbers['step_flops'] / 1e12:.6g} TFLOP (XLA's cost analysis: "
      f"{numbers['xla_step_flops'] / 1e12:.6g} TFLOP); collectives: {collectives}"
  )
  print(f"decoder per {unit} per batch: {numbers['decoder_flops'] / 1e12:.6g} TFLOP")
  if not spec:
    print(
        "(memory and bytes from the CPU backend: a structural check, not a TPU's figures; "
        "use --topology for those and the wall-time estimate)"
    )
    return
  g = spec.generation
  e = sampling_estimate(numbers, g, num_samples)
  print(
      f"decode step at the floor ({g.hbm_bytes_per_second / 1e9:.0f} GB/s HBM): "
      f"{e['step_seconds'] * 1e3:.4g} ms; its FLOPs at the {g.name} chip's "
      f"{g.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s peak: "
      f"{e['step_compute_seconds'] * 1e3:.4g} ms"
  )
  minutes = lambda s: f"{s / 60:,.1f} min"
  print(
      f"{num_samples:,} samples: {e['batches']} batches x {numbers['num_tokens']} decode "
      f"steps: {minutes(e['decode_seconds'])} at the floor, "
      f"{minutes(e['floor_ratio'] * e['decode_seconds'])} at {e['floor_ratio']:.2f}x it (the "
      f"sampler's measured ratio on CPU); decoder {minutes(e['decoder_seconds'])} at "
      f"{DECODER_MFU:.0%} MFU; total {minutes(e['floor_seconds'])} / "
      f"{minutes(e['measured_seconds'])}"
  )
