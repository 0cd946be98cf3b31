"""What a config's train step needs on a TPU slice (or any mesh), from its compiled program:
per-chip memory, model and hardware FLOPs, XLA's cost, collectives, and the paper's throughput
beside the speed the FLOPs allow. `python -m vim_jax.compile_report` prints it; tests and
benchmarks call `report` directly.
"""

from __future__ import annotations

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax import paper
from vim_jax.infra import checkpoint, fileio, flops, parallel, runs
from vim_jax.models import lpips as lpips_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib
from vim_jax.trainers import compiling, loop, microbatch, tokenizer_step, vim_step


class DoesNotFit(Exception):
  """The compiled step needs more memory per chip than the chip has."""


def tokenizer_model(config, tokenizer_config, for_sampling: bool = False):
  """Stage 2's tokenizer (ViTVQGAN), from tokenizer_config or config.tokenizer_workdir; None
  when the train step reads tokens and the config names no tokenizer (sampling always needs
  its decoder)."""
  if (
      tokenizer_config is None
      and config.tokenizer_workdir
      and fileio.exists(fileio.join(config.tokenizer_workdir, "config.json"))
  ):
    tokenizer_config = runs.read_run_config(config.tokenizer_workdir, "tokenizer")
  if tokenizer_config is not None:
    return tokenizer_lib.ViTVQGAN.from_config(tokenizer_config)
  if for_sampling:
    raise ValueError(
        "the sampler decodes its tokens to images with the tokenizer's decoder, so the report "
        f"needs the tokenizer's shape: config.tokenizer_workdir={config.tokenizer_workdir!r} "
        "holds no config.json. Pass --tokenizer_config=configs/vitvq_base.py (the tokenizer's "
        "config)."
    )
  if config.data.source != "tokens":
    raise ValueError(
        "stage 2 tokenizes images inside its train step, so the report needs the tokenizer's "
        f"shape: config.tokenizer_workdir={config.tokenizer_workdir!r} holds no config.json. "
        "Pass --tokenizer_config=configs/vitvq_base.py (the tokenizer's config), or compile "
        "for pre-tokenized shards with --config.data.source=tokens."
    )
  return None


def _stage1(config, mesh, batch_sharding, replicated):
  """(init_fn, {with_r1: step_fn}, batch spec, frozen LPIPS params or {})."""

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
    frozen = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), frozen
    )
  return init_fn, step_fns, batch, frozen


def _stage2(config, mesh, rules, batch_sharding, tok_model, tokens_per_image, codebook_size):
  """(init_fn, {False: step_fn}, batch spec, frozen encoder params or {})."""
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
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def compile_or_does_not_fit(jitted, *args):
  """compiling.compile_step, with the TPU compiler's out-of-memory as DoesNotFit."""
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
  return {
      "argument_bytes": m.argument_size_in_bytes,
      "output_bytes": m.output_size_in_bytes,
      "temp_bytes": m.temp_size_in_bytes,
      "alias_bytes": m.alias_size_in_bytes,
      "total_bytes": (
          m.argument_size_in_bytes
          + m.output_size_in_bytes
          + m.temp_size_in_bytes
          - m.alias_size_in_bytes
      ),
  }


def xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def report(
    config,
    devices=None,
    tokens_per_image: int = 1024,
    codebook_size: int = 8192,
    tokenizer_config=None,
    capacity_bytes: int | None = None,
) -> dict:
  """Compiles config's train step over `devices` (default: jax's); returns the numbers it
  prints, and the compiled step under 'compiled'. A stage-1 config with lazy R1 also compiles
  its R1 step (tokenizer_step.make_train_steps), whose memory is under 'r1'; the FLOPs are the mean
  per step over an R1 cycle ('flops': flops.StepFlops; 'flops_per_device': its model FLOPs).

  capacity_bytes: the chip's memory; DoesNotFit is raised when a step needs more (or when
  the TPU compiler itself runs out of memory).
  """

  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  loop.check_divisible(mesh, batch_size=config.batch_size)
  microbatch.check(config, parallel.data_parallel_size(mesh))
  if config.trainer in ("tokenizer", "vitvq"):
    init_fn, step_fns, batch, frozen = _stage1(config, mesh, batch_sharding, replicated)
  elif config.trainer == "vim":
    tok_model = tokenizer_model(config, tokenizer_config)
    init_fn, step_fns, batch, frozen = _stage2(
        config, mesh, rules, batch_sharding, tok_model, tokens_per_image, codebook_size
    )
  else:
    raise ValueError(
        f"config.trainer={config.trainer!r}; compile_report handles 'tokenizer' and "
        "'vim' configs."
    )

  rng = jax.random.key(0)  # outside the mesh: eager ops cannot run on compile-only devices
  with parallel.tracing_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, rng)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  start = time.perf_counter()
  compiled, step_flops = {}, {}
  for with_r1, step_fn in step_fns.items():
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding, frozen_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    with parallel.tracing_context(mesh, rules):
      compiled[with_r1], step_flops[with_r1] = compile_or_does_not_fit(
          jitted, abstract, batch, frozen
      )
  mean_flops = step_flops[False]
  if True in step_flops:
    mean_flops = flops.mean_over_cycle(
        step_flops[False], step_flops[True], tokenizer_step.r1_interval(config)
    )
  numbers = {
      "mesh": dict(mesh.shape),
      "devices": mesh.size,
      "platform": mesh_platform(mesh),
      "params": int(sum(x.size for x in jax.tree.leaves(abstract.params))),
      "flops": mean_flops,
      "flops_per_device": mean_flops.model,
      "compile_seconds": time.perf_counter() - start,
      "compiled": compiled[False],
  }
  cost = xla_cost(compiled[False])
  if "flops" in cost:
    numbers["xla_flops_per_device"] = float(cost["flops"])
  numbers.update(memory_numbers(compiled[False]))
  numbers["summary"] = compiling.describe_memory(compiled[False], "train step")
  numbers["collectives"] = count_collectives(compiled[False].as_text())
  if True in compiled:
    numbers["r1"] = {
        **memory_numbers(compiled[True]),
        "compiled": compiled[True],
        "flops": step_flops[True],
        "interval": tokenizer_step.r1_interval(config),
        "summary": compiling.describe_memory(compiled[True], "R1 step"),
    }
  # What the run needs per chip: the larger of its step programs.
  numbers["peak_bytes"] = max(
      numbers.get("total_bytes", 0), numbers.get("r1", {}).get("total_bytes", 0)
  )
  for name, n in (("the step", numbers), ("the R1 step", numbers.get("r1", {}))):
    if capacity_bytes and n.get("total_bytes", 0) > capacity_bytes:
      raise DoesNotFit(f"{name} needs {n['total_bytes'] / 2**30:.2f} GiB per chip")
  return numbers


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
  if config.trainer not in ("tokenizer", "vitvq") or config.image_size != 256:
    return None
  sizes = (paper.vit_size_of(config.model.encoder), paper.vit_size_of(config.model.decoder))
  return paper.STAGE1_THROUGHPUT.get(sizes)


def speed(
    flops_per_chip: float,
    batch_size: int,
    peak_flops: float,
    paper_images_per_sec: float | None,
    mfu: float = 0.4,
):
  """(step seconds at `mfu` of the chip's peak, images/s then, the MFU the paper's throughput
  needs or None)."""
  step_seconds = flops_per_chip / (mfu * peak_flops)
  needed = (
      flops_per_chip * paper_images_per_sec / batch_size / peak_flops
      if paper_images_per_sec
      else None
  )
  return step_seconds, batch_size / step_seconds, needed


def speed_lines(
    flops_per_chip: float,
    batch_size: int,
    peak_flops: float,
    peak_name: str,
    paper_images_per_sec: float | None,
    mfu: float = 0.4,
) -> list[str]:
  """Step time and images/s at `mfu` of the chip's peak; the MFU the paper's throughput needs."""
  step_seconds, images_per_sec, needed = speed(
      flops_per_chip, batch_size, peak_flops, paper_images_per_sec, mfu
  )
  lines = [
      f"at {mfu:.0%} MFU of {peak_name}: {step_seconds:.3f} s per step, "
      f"{images_per_sec:,.0f} images/s"
  ]
  if needed is not None:
    lines.append(
        f"the paper's {paper_images_per_sec:,.0f} images/s (v4-128) needs {needed:.1%} MFU here"
    )
  return lines


def print_report(config, numbers: dict, spec=None, num_slices: int = 1):
  where = (
      f"{num_slices} x {spec.name} ({spec.topology}, {spec.chips * num_slices} chips)"
      if spec
      else f"{numbers['devices']} x {numbers['platform']}"
  )
  print(
      f"config trainer={config.trainer}, {numbers['params'] / 1e6:.1f}M params, global batch "
      f"{config.batch_size}, mesh {numbers['mesh']} on {where}; compiled in "
      f"{numbers['compile_seconds']:.0f} s"
  )
  unit = "chip" if spec else "device"

  def memory_line(n: dict, what: str) -> str:
    gib = lambda key: n.get(key, float("nan")) / 2**30
    capacity = (
        f" of {spec.generation.hbm_bytes / 2**30:.0f} GiB HBM "
        f"({100 * n['total_bytes'] / spec.generation.hbm_bytes:.0f}%)"
        if spec and "total_bytes" in n
        else ""
    )
    return (
        f"{what}per {unit}: arguments {gib('argument_bytes'):.3f} GiB, outputs "
        f"{gib('output_bytes'):.3f} GiB, temporaries {gib('temp_bytes'):.3f} GiB, aliased "
        f"{gib('alias_bytes'):.3f} GiB, total {gib('total_bytes'):.3f} GiB{capacity}"
    )

  print(memory_line(numbers, ""))
  if "r1" in numbers:
    print(memory_line(numbers["r1"], f"the R1 step (every {numbers['r1']['interval']} steps) "))
  xla = numbers.get("xla_flops_per_device")
  f = numbers["flops"]
  cycle = " (mean over an R1 cycle)" if "r1" in numbers else ""
  print(
      f"per {unit} per step: {f.model / 1e12:.6g} TFLOP model{cycle} (what MFU counts: "
      f"causal attention at half, no recompute), {f.hardware / 1e12:.6g} TFLOP hardware "
      f"(+{100 * f.recompute_share:.1f}% rematerialised; vim_jax/infra/flops.py)"
      + (
          f"; XLA's cost analysis of the step: {xla / 1e12:.6g} TFLOP (a scanned stack's body "
          "once)"
          if xla is not None
          else ""
      )
  )
  if spec:
    for line in speed_lines(
        f.model,
        config.batch_size,
        spec.generation.peak_bf16_flops,
        f"a {spec.generation.name} chip's "
        f"{spec.generation.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s",
        paper_throughput(config),
    ):
      print(line)
    print(f"HFU at 40% MFU: {0.4 * (1 + f.recompute_share):.1%}")
  else:
    print(
        "(memory from the CPU backend: a structural check, not a TPU's figure; use "
        "--topology for that)"
    )
  print(
      "collectives in the compiled step: "
      + ", ".join(f"{op} {n}" for op, n in numbers["collectives"].items())
  )
