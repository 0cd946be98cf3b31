"""Compile a config's train step for a TPU slice (or a CPU mesh) without running it: per-chip
memory against the chip's HBM, FLOPs per step, and what the paper's throughput asks of it.

  # A real TPU compile, on any machine (needs libtpu: pip install '.[tpu]'):
  python -m vim_jax.compile_report --config=configs/vim_large.py --topology=v4-128
  python -m vim_jax.compile_report --config=configs/vitvq_base.py --topology=v5e-16 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 [--num_slices=2 --config.mesh.dcn_data=2]

  # A structural check on N virtual CPU devices (no libtpu):
  python -m vim_jax.compile_report --config=configs/vim_large.py --num_cpu_devices=8

Catches out-of-memory layouts before a slice is booked. The state is abstract (no arrays are
allocated); the step is lowered over the config's mesh, filled over the slice's chips, and
compiled.

- `--topology` compiles with the TPU compiler for compile-only devices (vim_jax/infra/tpu_slices.py):
  the memory is the chip's, as a TPU VM would see it, and a layout that does not fit in the
  chip's HBM exits with status 1 and says so.
- `--num_cpu_devices` compiles with XLA's CPU backend. It checks that the sharded program
  builds and which collectives it holds; its memory figures are not a TPU's (the CPU backend
  fuses and schedules differently: VIM-Large at batch 8 on 8 devices reads 7 GiB per device
  there and far less per chip for a v4).

Stage 1 includes LPIPS and the discriminator when the config has them (shapes only: no weights
file is needed). Stage 2 tokenizes images inside the step, as training does, unless the config
reads pre-tokenized shards (data.source='tokens'); the tokenizer's shape comes from
--tokenizer_config, else from config.tokenizer_workdir's config.json.

`--program=sample` compiles a stage-2 config's sampler instead, as generation.Sampler runs it
(data-parallel over every chip, params replicated, each batch split over the chips), and what
50k samples (--num_samples) will cost:

  python -m vim_jax.compile_report --program=sample --config=configs/vim_large.py \
      --tokenizer_config=configs/vitvq_base.py --topology=v4-128 \
      [--sample_batch_size=1024] [--config.sampling.guidance_scale=2]

- per-chip memory of the whole sampler (the 1024 KV-cached decode steps, then the tokenizer's
  decoder on the token grids), against the chip's HBM; too much exits with status 1;
- one decode step compiled on its own (autoregressive.make_decode_step, the loop's body, cache donated): XLA's
  bytes accessed and FLOPs per chip beside the step's floor, the params and the KV cache read
  once. On TPU XLA's count is an upper bound: it counts the whole operand of each async slice
  that prefetches a param into on-chip memory;
- the wall time of 50k samples: ceil(50000 / batch) batches x 1024 steps x floor bytes / the
  chip's HBM bandwidth (the floor), and x MEASURED_FLOOR_RATIO (the sampler's measured ratio
  to the floor), plus the decoder at 40% MFU.

--sample_batch_size counts images over all chips (default: config.sampling.batch_size sequences
per chip); guidance (sampling.guidance_scale != 1) decodes two sequences per image, which
doubles the cache and the step's bytes per image. Numbers: benchmarks/RESULTS.md, "Sampling 50k
images: sizing on TPU".
"""

from __future__ import annotations

import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from vim_jax.infra import config_files, log_filters, tpu_slices


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                  lock_config=True)
  flags.DEFINE_enum("program", "train", ["train", "sample"], "What to compile: the config's "
                    "train step, or a stage-2 config's sampler (its decode step and the "
                    "tokenizer's decoder) with the wall time of --num_samples images.")
  flags.DEFINE_integer("sample_batch_size", 0, "--program=sample: images per sampling batch "
                       "over all chips (global; a multiple of the chip count); guidance "
                       "(--config.sampling.guidance_scale != 1) decodes twice as many "
                       "sequences. 0 = the config's default: config.sampling.batch_size "
                       "sequences per chip.")
  flags.DEFINE_integer("num_samples", 50_000, "--program=sample: images the wall-time estimate "
                       "is for (50k: the FID protocol).")
  flags.DEFINE_string("topology", "", "Compile for this Google Cloud TPU slice, e.g. v4-128, "
                      "v5p-256, v5e-16 (v5litepod-16), v6e-64; needs libtpu (pip install "
                      "'.[tpu]'). Empty: the local devices (or --num_cpu_devices).")
  flags.DEFINE_integer("num_slices", 1, "With --topology: this many slices joined over DCN "
                       "(lay the mesh out with --config.mesh.dcn_*).")
  flags.DEFINE_integer("num_cpu_devices", 0, "Make this many virtual CPU devices (XLA host "
                       "platform) before jax starts; 0 = the real devices. A structural check: "
                       "the memory figures are the CPU backend's, not a TPU's.")
  config_flags.DEFINE_config_file("tokenizer_config", None, "Stage 2 on images: the "
                                  "tokenizer's config file (e.g. configs/vitvq_base.py); "
                                  "default: config.tokenizer_workdir's config.json.")
  flags.DEFINE_integer("tokens_per_image", 1024, "Stage 2 on pre-tokenized shards without a "
                       "tokenizer config: tokens per image (paper: 32 x 32).")
  flags.DEFINE_integer("codebook_size", 8192, "Stage 2 on pre-tokenized shards without a "
                       "tokenizer config: codebook size (paper: 8192).")


class DoesNotFit(Exception):
  """The compiled step needs more memory per chip than the chip has."""


def _tokenizer_model(config, tokenizer_config, for_sampling: bool = False):
  """Stage 2's tokenizer (ViTVQGAN), from tokenizer_config or config.tokenizer_workdir; None
  when the train step reads tokens and the config names no tokenizer (sampling always needs
  its decoder)."""
  from vim_jax.infra import fileio, runs
  from vim_jax.models import tokenizer as tokenizer_lib
  if tokenizer_config is None and config.tokenizer_workdir and fileio.exists(
      fileio.join(config.tokenizer_workdir, "config.json")):
    tokenizer_config = runs.read_run_config(config.tokenizer_workdir, "tokenizer")
  if tokenizer_config is not None:
    return tokenizer_lib.ViTVQGAN.from_config(tokenizer_config)
  if for_sampling:
    raise ValueError(
        "the sampler decodes its tokens to images with the tokenizer's decoder, so the report "
        f"needs the tokenizer's shape: config.tokenizer_workdir={config.tokenizer_workdir!r} "
        "holds no config.json. Pass --tokenizer_config=configs/vitvq_base.py (the tokenizer's "
        "config).")
  if config.data.source != "tokens":
    raise ValueError(
        "stage 2 tokenizes images inside its train step, so the report needs the tokenizer's "
        f"shape: config.tokenizer_workdir={config.tokenizer_workdir!r} holds no config.json. "
        "Pass --tokenizer_config=configs/vitvq_base.py (the tokenizer's config), or compile "
        "for pre-tokenized shards with --config.data.source=tokens.")
  return None


def _stage1(config, mesh, batch_sharding, replicated):
  """(init_fn, {with_r1: step_fn}, batch spec, frozen LPIPS params or {})."""
  import jax
  import jax.numpy as jnp

  from vim_jax.infra import parallel
  from vim_jax.trainers import tokenizer_step
  from vim_jax.models import lpips as lpips_lib
  models = tokenizer_step.build_models(config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(config)
  dp = parallel.data_parallel_size(mesh)
  init_fn = tokenizer_step.make_init_fn(models, tx, disc_tx, config, dp)
  step_fns = tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, config, dp)
  batch = tokenizer_step.batch_spec(config, config.batch_size, batch_sharding)
  frozen = {}
  if models.lpips is not None:  # shapes only: no weights file is needed to compile
    x = jnp.zeros((1, 32, 32, 3))
    frozen = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), x, x)["params"]
    frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                         sharding=replicated), frozen)
  return init_fn, step_fns, batch, frozen


def _stage2(config, mesh, rules, batch_sharding, tok_model, tokens_per_image, codebook_size):
  """(init_fn, {False: step_fn}, batch spec, frozen encoder params or {})."""
  from vim_jax.infra import parallel, runs
  from vim_jax.trainers import vim_step
  from vim_jax.models import vim as vim_lib
  if tok_model is not None:
    model = vim_step.build_model(config, tok_model)
    tokens_per_image = model.num_tokens
  else:
    model = vim_lib.VIM.from_config(config, codebook_size, tokens_per_image)
  tx, schedule = vim_step.build_optimizer(config)
  dp = parallel.data_parallel_size(mesh)
  init_fn = vim_step.make_init_fn(model, tx, dp)
  step_fn = vim_step.make_train_step(model, tok_model, tx, schedule, config, dp)
  batch = vim_step.batch_spec(config, config.batch_size, tokens_per_image, batch_sharding)
  frozen = {}
  if "image" in batch:  # the frozen encoder and codebook, as the VIM trainer holds them
    frozen = runs.frozen_encoder_shapes(tok_model, mesh, rules)
  return init_fn, {False: step_fn}, batch, frozen


def tree_bytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _compile(jitted, *args):
  """compiling.compile_step, with the TPU compiler's out-of-memory as DoesNotFit."""
  from vim_jax.trainers import compiling
  try:
    return compiling.compile_step(jitted, *args)
  except Exception as e:  # pylint: disable=broad-except; only the TPU compiler's OOM is ours
    if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
      raise DoesNotFit(str(e).strip().splitlines()[0][:1500]) from e
    raise


def memory_numbers(compiled) -> dict:
  """Per-device bytes of a compiled program's memory analysis ({} when it has none)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "total_bytes": (m.argument_size_in_bytes + m.output_size_in_bytes +
                          m.temp_size_in_bytes - m.alias_size_in_bytes)}


def xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def report(config, devices=None, tokens_per_image: int = 1024, codebook_size: int = 8192,
           tokenizer_config=None, capacity_bytes: int | None = None) -> dict:
  """Compiles config's train step over `devices` (default: jax's); returns the numbers it
  prints, and the compiled step under 'compiled'. A stage-1 config with lazy R1 also compiles
  its R1 step (tokenizer_step.make_train_steps), whose memory is under 'r1'; the FLOPs are the mean
  per step over an R1 cycle ('flops': flops.StepFlops; 'flops_per_device': its model FLOPs).

  capacity_bytes: the chip's memory; DoesNotFit is raised when a step needs more (or when
  the TPU compiler itself runs out of memory).
  """
  import flax.linen as nn
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vim_jax.infra import checkpoint, flops, parallel
  from vim_jax.trainers import microbatch, tokenizer_step
  from vim_jax.trainers import compiling, loop

  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  loop.check_divisible(mesh, batch_size=config.batch_size)
  microbatch.check(config, parallel.data_parallel_size(mesh))
  if config.trainer in ("tokenizer", "vitvq"):
    init_fn, step_fns, batch, frozen = _stage1(config, mesh, batch_sharding, replicated)
  elif config.trainer == "vim":
    tok_model = _tokenizer_model(config, tokenizer_config)
    init_fn, step_fns, batch, frozen = _stage2(config, mesh, rules, batch_sharding, tok_model,
                                               tokens_per_image, codebook_size)
  else:
    raise ValueError(f"config.trainer={config.trainer!r}; compile_report handles 'tokenizer' and "
                     "'vim' configs.")

  rng = jax.random.key(0)  # outside the mesh: eager ops cannot run on compile-only devices
  with parallel.tracing_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, rng)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  start = time.perf_counter()
  compiled, step_flops = {}, {}
  for with_r1, step_fn in step_fns.items():
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, frozen_shardings),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    with parallel.tracing_context(mesh, rules):
      compiled[with_r1], step_flops[with_r1] = _compile(jitted, abstract, batch, frozen)
  mean_flops = step_flops[False]
  if True in step_flops:
    mean_flops = flops.mean_over_cycle(step_flops[False], step_flops[True],
                                       tokenizer_step.r1_interval(config))
  numbers = {"mesh": dict(mesh.shape), "devices": mesh.size, "platform": mesh_platform(mesh),
             "params": int(sum(x.size for x in jax.tree.leaves(abstract.params))),
             "flops": mean_flops, "flops_per_device": mean_flops.model,
             "compile_seconds": time.perf_counter() - start, "compiled": compiled[False]}
  cost = xla_cost(compiled[False])
  if "flops" in cost:
    numbers["xla_flops_per_device"] = float(cost["flops"])
  numbers.update(memory_numbers(compiled[False]))
  numbers["summary"] = compiling.describe_memory(compiled[False], "train step")
  numbers["collectives"] = count_collectives(compiled[False].as_text())
  if True in compiled:
    numbers["r1"] = {**memory_numbers(compiled[True]), "compiled": compiled[True],
                     "flops": step_flops[True], "interval": tokenizer_step.r1_interval(config),
                     "summary": compiling.describe_memory(compiled[True], "R1 step")}
  # What the run needs per chip: the larger of its step programs.
  numbers["peak_bytes"] = max(numbers.get("total_bytes", 0),
                              numbers.get("r1", {}).get("total_bytes", 0))
  for name, n in (("the step", numbers), ("the R1 step", numbers.get("r1", {}))):
    if capacity_bytes and n.get("total_bytes", 0) > capacity_bytes:
      raise DoesNotFit(f"{name} needs {n['total_bytes'] / 2**30:.2f} GiB per chip")
  return numbers


# --- The sampler (--program=sample) -----------------------------------------------------------

# The sampler's time per token over its memory floor (the time to read the params and the KV
# cache once), measured on CPU for the scanned layout by benchmarks/decode_floor.py (see
# benchmarks/RESULTS.md). The 50k-sample estimate is given at the floor and at this ratio.
MEASURED_FLOOR_RATIO = 1.42
DECODER_MFU = 0.4  # the tokenizer's decoder is a ViT over 1024 tokens: compute-bound


def _decoding_model_and_params(model, params):
  """(VIM unrolled for decoding, its params' shapes) from the scanned ones, as the sampler
  converts them once (autoregressive.decoding_layout) and then holds only the unrolled copy."""
  import jax

  from vim_jax.sampling import autoregressive
  converted = {}

  def convert(p):  # decoding_layout slices arrays: run it on shapes under eval_shape
    converted["model"], p = autoregressive.decoding_layout(model, p)
    return p

  shapes = jax.eval_shape(convert, params)
  return converted["model"], shapes


def check_sample_batch(batch_size: int, chips: int):
  """The sampler splits a batch evenly over the chips (generation.Sampler)."""
  if batch_size < 1 or batch_size % chips:
    raise ValueError(f"--sample_batch_size={batch_size}: the sampler splits each batch evenly "
                     f"over the {chips} chips; use a positive multiple of {chips} (e.g. "
                     f"{max(chips, batch_size // chips * chips)}).")


def sample_report(config, devices=None, batch_size: int = 0, tokenizer_config=None,
                  capacity_bytes: int | None = None) -> dict:
  """Compiles the sampler generation.Sampler runs (data-parallel over `devices`, params
  replicated, the batch split over the chips) for one batch of `batch_size` images (0:
  vim_step.sampling_batch_size(config, chips)), and one of its decode steps on its own.

  Returns per-chip numbers: the whole sampler's memory (1024 KV-cached decode steps, then the
  tokenizer's decoder on the token grids), the decode step's XLA cost (bytes accessed, FLOPs)
  beside its floor (params + KV cache bytes per chip), and the decoder's FLOPs per batch.
  The tokenizer holds its quantizer and decoder only (what decoding reads).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vim_jax.infra import flops, hlo_stats, parallel, runs
  from vim_jax.sampling import autoregressive
  from vim_jax.trainers import compiling, vim_step
  from vim_jax.models import tokenizer as tokenizer_lib
  if config.trainer != "vim":
    raise ValueError(f"--program=sample compiles a stage-2 (VIM) config's sampler; "
                     f"config.trainer={config.trainer!r}.")
  tok_model = _tokenizer_model(config, tokenizer_config, for_sampling=True)
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
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  model, params = _decoding_model_and_params(model, runs.vim_param_shapes(model))
  params = shaped(params, replicated)
  tok_params = {k: v for k, v in runs.tokenizer_param_shapes(tok_model).items()
                if k != "encoder"}
  tok_params = shaped(tok_params, replicated)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  int_spec = lambda shape, sharding: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

  start = time.perf_counter()
  sample = jax.jit(vim_step.make_sample_fn(model, tok_model, sampling),
                   in_shardings=(replicated, replicated, batched, replicated))
  compiled, _ = _compile(sample, params, tok_params, int_spec((batch_size,), batched), key)
  numbers = memory_numbers(compiled)
  if capacity_bytes and numbers.get("total_bytes", 0) > capacity_bytes:
    raise DoesNotFit(f"the sampler needs {numbers['total_bytes'] / 2**30:.2f} GiB per chip")
  cache = shaped(jax.eval_shape(lambda: autoregressive.init_cache(model, rows)), batched)
  chip_cache_shape = (rows // chips, *jax.tree.leaves(cache)[0].shape[1:])  # one layer's K
  sampler_hlo = compiled.as_text()
  loop = hlo_stats.largest_loop_state(sampler_hlo, chip_cache_shape)
  numbers.update(loop_bytes=loop["bytes"], loop_cache_bytes=loop["cache_bytes"],
                 cache_writes=hlo_stats.buffer_writes_in_loops(sampler_hlo, chip_cache_shape))

  step = jax.jit(autoregressive.make_decode_step(model, sampling),
                 in_shardings=(replicated, batched, batched, batched, batched, replicated,
                               replicated), donate_argnums=(1, 4))
  step_compiled, step_flops = _compile(
      step, params, cache, int_spec((rows,), batched), int_spec((rows,), batched),
      int_spec((batch_size, model.num_tokens), batched), int_spec((), replicated), key)
  cost = xla_cost(step_compiled)
  grid = jax.ShapeDtypeStruct((batch_size // chips, *tok_model.grid), jnp.int32)
  decoder_flops = flops.step_flops(
      lambda p, g: tok_model.apply({"params": p}, g,
                                   method=tokenizer_lib.ViTVQGAN.decode_from_indices),
      shaped(tok_params, None), grid)
  numbers.update({
      "mesh": dict(mesh.shape), "devices": chips, "platform": mesh_platform(mesh),
      "batch_size": batch_size, "rows": rows, "guided": guided,
      "guidance_scale": sampling.guidance_scale, "num_tokens": model.num_tokens,
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "decoder_params": int(sum(x.size for x in jax.tree.leaves(tok_params["decoder"]))),
      "params_bytes": tree_bytes(params), "cache_bytes": tree_bytes(cache) // chips,
      "step_flops": step_flops.hardware, "xla_step_flops": float(cost.get("flops", float("nan"))),
      "xla_step_bytes": float(cost.get("bytes accessed", float("nan"))),
      "decoder_flops": decoder_flops, "compile_seconds": time.perf_counter() - start,
      "compiled": compiled, "step_compiled": step_compiled,
      "step_collectives": count_collectives(step_compiled.as_text()),
      "summary": compiling.describe_memory(compiled, "sampler")})
  numbers["model_floor_bytes"] = numbers["params_bytes"] + numbers["cache_bytes"]
  return numbers


def sampling_estimate(numbers: dict, generation, num_samples: int = 50_000,
                      floor_ratio: float = MEASURED_FLOOR_RATIO,
                      decoder_mfu: float = DECODER_MFU) -> dict:
  """Wall time of `num_samples` images from sample_report's numbers on chips of `generation`
  (tpu_slices.Generation): ceil(num_samples / batch) batches, each N decode steps and the
  decoder. A decode step reads the decode loop's state (loop_bytes per chip) through HBM: at
  its bandwidth (the floor) and floor_ratio times that (the sampler's measured ratio to its
  floor); the decoder runs at decoder_mfu of the chip's peak. Seconds."""
  batches = math.ceil(num_samples / numbers["batch_size"])
  step = numbers["loop_bytes"] / generation.hbm_bytes_per_second
  decode = batches * numbers["num_tokens"] * step
  decoder = batches * numbers["decoder_flops"] / (decoder_mfu * generation.peak_bf16_flops)
  return {"batches": batches, "step_seconds": step, "decode_seconds": decode,
          "decoder_seconds": decoder, "floor_seconds": decode + decoder,
          "measured_seconds": floor_ratio * decode + decoder, "floor_ratio": floor_ratio,
          "step_compute_seconds": numbers["step_flops"] / generation.peak_bf16_flops}


def print_sample_report(numbers: dict, spec=None, num_samples: int = 50_000):
  gib = lambda key: numbers.get(key, float("nan")) / 2**30
  gb = lambda b: f"{b / 1e9:.4g} GB"
  where = (f"{spec.name} ({spec.topology}, {spec.chips} chips)" if spec
           else f"{numbers['devices']} x {numbers['platform']}")
  unit = "chip" if spec else "device"
  per = numbers["rows"] // numbers["devices"]
  guidance = (f"guidance {numbers['guidance_scale']:g}: {numbers['rows']} sequences decoded, "
              if numbers["guided"] else "no guidance: ")
  print(f"sampler: VIM {numbers['params'] / 1e6:.1f}M params (unrolled for decoding) and the "
        f"tokenizer's decoder ({numbers['decoder_params'] / 1e6:.1f}M); global batch "
        f"{numbers['batch_size']} images ({guidance}{per} per {unit}), data-parallel on {where}, "
        f"params replicated; compiled in {numbers['compile_seconds']:.0f} s")
  capacity = (f" of {spec.generation.hbm_bytes / 2**30:.0f} GiB HBM "
              f"({100 * numbers['total_bytes'] / spec.generation.hbm_bytes:.0f}%)"
              if spec and "total_bytes" in numbers else "")
  print(f"per {unit}, the whole sampler ({numbers['num_tokens']} decode steps, then the "
        f"decoder): arguments {gib('argument_bytes'):.3f} GiB, outputs {gib('output_bytes'):.3f} "
        f"GiB, temporaries {gib('temp_bytes'):.3f} GiB, aliased {gib('alias_bytes'):.3f} GiB, "
        f"total {gib('total_bytes'):.3f} GiB{capacity}")
  writes = numbers["cache_writes"]
  rest = numbers["loop_bytes"] - numbers["loop_cache_bytes"]
  print(f"decode step floor per {unit}: the decode loop's state as compiled, read once a step, "
        f"{gb(numbers['loop_bytes'])}: KV cache {gb(numbers['loop_cache_bytes'])} as laid out, "
        f"params as the loop reads them and the rest {gb(rest)} "
        f"(from the model: params {gb(numbers['params_bytes'])} as stored + KV cache "
        f"{gb(numbers['cache_bytes'])} = {gb(numbers['model_floor_bytes'])}); the loop writes "
        f"the cache {writes['updates']} times a step in place and copies it {writes['full']} times")
  collectives = ", ".join(f"{op} {n}" for op, n in numbers["step_collectives"].items()
                          if n) or "none"
  ratio = numbers["xla_step_bytes"] / numbers["loop_bytes"]
  print(f"decode step compiled alone, per {unit}: XLA's bytes accessed "
        f"{gb(numbers['xla_step_bytes'])} ({ratio:.2f}x the floor), "
        f"{numbers['step_flops'] / 1e12:.6g} TFLOP (XLA's cost analysis: "
        f"{numbers['xla_step_flops'] / 1e12:.6g} TFLOP); collectives: {collectives}")
  print(f"decoder per {unit} per batch: {numbers['decoder_flops'] / 1e12:.6g} TFLOP")
  if not spec:
    print("(memory and bytes from the CPU backend: a structural check, not a TPU's figures; "
          "use --topology for those and the wall-time estimate)")
    return
  g = spec.generation
  e = sampling_estimate(numbers, g, num_samples)
  print(f"decode step at the floor ({g.hbm_bytes_per_second / 1e9:.0f} GB/s HBM): "
        f"{e['step_seconds'] * 1e3:.4g} ms; its FLOPs at the {g.name} chip's "
        f"{g.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s peak: "
        f"{e['step_compute_seconds'] * 1e3:.4g} ms")
  minutes = lambda s: f"{s / 60:,.1f} min"
  print(f"{num_samples:,} samples: {e['batches']} batches x {numbers['num_tokens']} decode "
        f"steps: {minutes(e['decode_seconds'])} at the floor, "
        f"{minutes(e['floor_ratio'] * e['decode_seconds'])} at {e['floor_ratio']:.2f}x it (the "
        f"sampler's measured ratio on CPU); decoder {minutes(e['decoder_seconds'])} at "
        f"{DECODER_MFU:.0%} MFU; total {minutes(e['floor_seconds'])} / "
        f"{minutes(e['measured_seconds'])}")


def mesh_platform(mesh) -> str:
  """The platform of the chips the mesh holds (tpu for compile-only TPU devices)."""
  return mesh.devices.flat[0].platform


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each cross-device op the compiled HLO holds (async pairs counted once).
  In a data-parallel step, all-to-all and collective-permute mean examples travel between
  devices; the gradient all-reduce is the only traffic needed."""
  # The op name follows the result shape, which is a tuple with spaces for combined ops.
  found = re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
  return {op: found.count(op) for op in COLLECTIVES}


def paper_throughput(config) -> float | None:
  """Images/s the paper trained this config at on a v4-128 (stage-1 SS, BB, SL), else None."""
  from vim_jax import paper
  if config.trainer not in ("tokenizer", "vitvq") or config.image_size != 256:
    return None
  sizes = (paper.vit_size_of(config.model.encoder), paper.vit_size_of(config.model.decoder))
  return paper.STAGE1_THROUGHPUT.get(sizes)


def speed(flops_per_chip: float, batch_size: int, peak_flops: float,
          paper_images_per_sec: float | None, mfu: float = 0.4):
  """(step seconds at `mfu` of the chip's peak, images/s then, the MFU the paper's throughput
  needs or None)."""
  step_seconds = flops_per_chip / (mfu * peak_flops)
  needed = (flops_per_chip * paper_images_per_sec / batch_size / peak_flops
            if paper_images_per_sec else None)
  return step_seconds, batch_size / step_seconds, needed


def speed_lines(flops_per_chip: float, batch_size: int, peak_flops: float, peak_name: str,
                paper_images_per_sec: float | None, mfu: float = 0.4) -> list[str]:
  """Step time and images/s at `mfu` of the chip's peak; the MFU the paper's throughput needs."""
  step_seconds, images_per_sec, needed = speed(flops_per_chip, batch_size, peak_flops,
                                               paper_images_per_sec, mfu)
  lines = [f"at {mfu:.0%} MFU of {peak_name}: {step_seconds:.3f} s per step, "
           f"{images_per_sec:,.0f} images/s"]
  if needed is not None:
    lines.append(f"the paper's {paper_images_per_sec:,.0f} images/s (v4-128) needs "
                 f"{needed:.1%} MFU here")
  return lines


def print_report(config, numbers: dict, spec=None, num_slices: int = 1):
  where = (f"{num_slices} x {spec.name} ({spec.topology}, {spec.chips * num_slices} chips)"
           if spec else f"{numbers['devices']} x {numbers['platform']}")
  print(f"config trainer={config.trainer}, {numbers['params'] / 1e6:.1f}M params, global batch "
        f"{config.batch_size}, mesh {numbers['mesh']} on {where}; compiled in "
        f"{numbers['compile_seconds']:.0f} s")
  unit = "chip" if spec else "device"

  def memory_line(n: dict, what: str) -> str:
    gib = lambda key: n.get(key, float("nan")) / 2**30
    capacity = (f" of {spec.generation.hbm_bytes / 2**30:.0f} GiB HBM "
                f"({100 * n['total_bytes'] / spec.generation.hbm_bytes:.0f}%)"
                if spec and "total_bytes" in n else "")
    return (f"{what}per {unit}: arguments {gib('argument_bytes'):.3f} GiB, outputs "
            f"{gib('output_bytes'):.3f} GiB, temporaries {gib('temp_bytes'):.3f} GiB, aliased "
            f"{gib('alias_bytes'):.3f} GiB, total {gib('total_bytes'):.3f} GiB{capacity}")

  print(memory_line(numbers, ""))
  if "r1" in numbers:
    print(memory_line(numbers["r1"], f"the R1 step (every {numbers['r1']['interval']} steps) "))
  xla = numbers.get("xla_flops_per_device")
  f = numbers["flops"]
  cycle = " (mean over an R1 cycle)" if "r1" in numbers else ""
  print(f"per {unit} per step: {f.model / 1e12:.6g} TFLOP model{cycle} (what MFU counts: "
        f"causal attention at half, no recompute), {f.hardware / 1e12:.6g} TFLOP hardware "
        f"(+{100 * f.recompute_share:.1f}% rematerialised; vim_jax/infra/flops.py)" +
        (f"; XLA's cost analysis of the step: {xla / 1e12:.6g} TFLOP (a scanned stack's body "
         "once)" if xla is not None else ""))
  if spec:
    for line in speed_lines(f.model, config.batch_size, spec.generation.peak_bf16_flops,
                            f"a {spec.generation.name} chip's "
                            f"{spec.generation.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s",
                            paper_throughput(config)):
      print(line)
    print(f"HFU at 40% MFU: {0.4 * (1 + f.recompute_share):.1%}")
  else:
    print("(memory from the CPU backend: a structural check, not a TPU's figure; use "
          "--topology for that)")
  print("collectives in the compiled step: " +
        ", ".join(f"{op} {n}" for op, n in numbers["collectives"].items()))


def main(argv):
  log_filters.install()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.topology and FLAGS.num_cpu_devices:
    raise app.UsageError("--topology and --num_cpu_devices are two different targets; give "
                         "one.")
  spec = devices = None
  if FLAGS.topology:
    try:
      spec = tpu_slices.parse(FLAGS.topology)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    if not tpu_slices.libtpu_available():
      sys.exit(f"error: {tpu_slices.INSTALL_HINT}")
    # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR) cannot give back a program
    # for compile-only devices (reading one needs a client for them): do not write any. Set
    # before anything compiles: jax decides once per process.
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    devices = tpu_slices.compile_only_devices(spec, FLAGS.num_slices)
  elif FLAGS.num_cpu_devices:
    # Must happen before jax creates its backends (nothing above has touched a device).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={FLAGS.num_cpu_devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  config = FLAGS.config
  capacity = spec.generation.hbm_bytes if spec else None
  if FLAGS.program == "sample":
    if FLAGS.num_slices != 1:
      raise app.UsageError("--program=sample compiles for one slice (each chip samples on its "
                           "own; more slices only divide the batches): drop --num_slices.")
    return main_sample(config, spec, devices, capacity)
  try:
    numbers = report(config, devices, FLAGS.tokens_per_image, FLAGS.codebook_size,
                     FLAGS.tokenizer_config, capacity)
  except DoesNotFit as e:
    where = (f"{FLAGS.num_slices} x {spec.name} ({capacity / 2**30:.0f} GiB per chip)" if spec
             else "these devices")
    sys.exit(f"error: does not fit: config trainer={config.trainer}, global batch "
             f"{config.batch_size}, mesh {config.mesh.to_dict()} on {where}: {e}\n"
             "To fit: shard the state (--config.mesh.data=1 --config.mesh.fsdp=-1), "
             "rematerialise the blocks (remat_policy='full' in the model's stacks), "
             "accumulate gradients (--config.grad_accum_steps=k), or use a larger slice.")
  print_report(config, numbers, spec, FLAGS.num_slices)


def main_sample(config, spec, devices, capacity):
  FLAGS = flags.FLAGS
  try:
    numbers = sample_report(config, devices, FLAGS.sample_batch_size, FLAGS.tokenizer_config,
                            capacity)
  except ValueError as e:  # a batch the chips cannot split, a missing tokenizer shape
    sys.exit(f"error: {e}")
  except DoesNotFit as e:
    where = f"{spec.name} ({capacity / 2**30:.0f} GiB per chip)" if spec else "these devices"
    sys.exit(f"error: does not fit: the sampler of config trainer=vim at "
             f"--sample_batch_size={FLAGS.sample_batch_size or 'default'} on {where}: {e}\n"
             "To fit: a smaller --sample_batch_size (or --config.sampling.batch_size, sequences "
             "per chip), or guidance off (--config.sampling.guidance_scale=1 halves the "
             "sequences per image).")
  print_sample_report(numbers, spec, FLAGS.num_samples)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("config")
  config_files.add_config_roots(sys.argv)  # `from configs import common`, from any folder
  app.run(main)
