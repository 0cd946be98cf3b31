"""Sizing table: the paper's configs compiled for TPU slices by libtpu on this machine.

  python benchmarks/tpu_sizing.py [--configs=ss,bb,sl,vim_base,vim_large] [--topology=v4-128]
  python benchmarks/tpu_sizing.py --smallest=v4,v5p [--configs=...]

The first form compiles each config's train step (stage 1 with its full objective at batch
256, stage 2 at batch 1024 tokenizing with ViT-VQGAN Base, as configs/vim_*.py train) for one
slice, with the config's own defaults (grad_accum_steps, remat), and prints a markdown row per
config: per-chip HBM (stage 1 with lazy R1: the regular step's, and the R1 step's total) and
the share left free, model and hardware TFLOP per chip per step (vim_jax/infra/flops.py), step time
and images/s at 40% MFU, the paper's throughput and the MFU it needs, and the compile time.

--smallest walks each generation's slices up from its smallest to 64 chips and reports the
first that fits, with the fewest grad_accum_steps (1, 2, 4, 8) that make it fit.
A successful compile of a paper config takes minutes (RESULTS.md), a refusal seconds.
Needs libtpu (pip install '.[tpu]').
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vim_jax import main as vim_main  # noqa: E402
from vim_jax.infra import tpu_slices  # noqa: E402

CONFIGS = {  # name: (config file, global batch)
    "ss": ("configs/vitvq_small.py", 256),
    "bb": ("configs/vitvq_base.py", 256),
    "sl": ("configs/vitvq_large.py", 256),
    "vim_base": ("configs/vim_base.py", 1024),
    "vim_large": ("configs/vim_large.py", 1024),
}


def load(name: str, grad_accum_steps: int | None = None):
  """The config at its paper batch, with its own grad_accum_steps unless one is given."""
  path, batch = CONFIGS[name]
  config = vim_main.load_config_file(os.path.join(ROOT, path))
  config.update(batch_size=batch)
  if grad_accum_steps is not None:
    config.grad_accum_steps = grad_accum_steps
  return config


def compile_for(name: str, spec, grad_accum_steps: int | None = None):
  """compile_report's numbers, or None when the layout does not fit."""
  from vim_jax.trainers import (
      step_report,  # lazy: may load jax, which waits for prepare_environment
  )

  config = load(name, grad_accum_steps)
  tokenizer = None
  if config.trainer == "vim":
    tokenizer = vim_main.load_config_file(os.path.join(ROOT, "configs/vitvq_base.py"))
  devices = tpu_slices.compile_only_devices(spec)
  try:
    numbers = step_report.report(
        config, devices, tokenizer_config=tokenizer, capacity_bytes=spec.generation.hbm_bytes
    )
  except step_report.DoesNotFit:
    return None
  numbers["config"] = config
  return numbers


def row(name: str, spec, numbers) -> str:
  """A markdown row: layout, per-chip memory (the regular step's; the R1 step's total beside it
  when the config has one) and what is free, model / hardware FLOPs, speed at 40% MFU."""
  from vim_jax.trainers import (
      step_report,  # lazy: may load jax, which waits for prepare_environment
  )

  config = numbers["config"]
  g = spec.generation
  paper = step_report.paper_throughput(config)
  f = numbers["flops"]
  step, images_per_sec, needed_mfu = step_report.speed(
      f.model, config.batch_size, g.peak_bf16_flops, paper
  )
  needed = f"{paper:,.0f} img/s = {needed_mfu:.1%} MFU" if paper else ""
  gib = lambda n, key: n[key] / 2**30
  r1 = f"; R1 step {gib(numbers['r1'], 'total_bytes'):.2f}" if "r1" in numbers else ""
  return (
      f"| {name} | {config.batch_size} | {numbers['mesh']}, accumulation "
      f"{config.grad_accum_steps} | {gib(numbers, 'argument_bytes'):.2f} / "
      f"{gib(numbers, 'temp_bytes'):.2f} / {gib(numbers, 'total_bytes'):.2f}{r1} GiB | "
      f"**{1 - numbers['peak_bytes'] / g.hbm_bytes:.0%}** | "
      f"{f.model / 1e12:.2f} / {f.hardware / 1e12:.2f} | {step:.3f} s, "
      f"{images_per_sec:,.0f} img/s | {needed} | "
      f"{numbers['compile_seconds']:.0f} s |"
  )


def fits_with(name: str, spec):
  """(the smallest grad_accum_steps of 1, 2, 4, 8 with which the config fits on the slice,
  its numbers), or None. A layout far over capacity is refused in seconds, so trying the
  small accumulations first costs little."""
  for k in (1, 2, 4, 8):
    if load(name).batch_size % (k * spec.chips):
      return None  # each microbatch must still split over the chips
    start = time.perf_counter()
    numbers = compile_for(name, spec, k)
    print(
        f"  {name} on {spec.name}, grad_accum_steps={k}: "
        f"{'fits' if numbers else 'does not fit'} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if numbers is not None:
      return k, numbers
  return None


def smallest(name: str, generation: str):
  """(slice name, grad_accum_steps, GiB per chip) of the smallest slice of `generation`, up to
  64 chips, that the config fits on; None if not even 64 chips hold it. Walks up from the
  generation's smallest slice: per-chip memory only falls as chips are added (the same
  microbatch per chip, the parameters spread over more of them), so the first fit is the
  smallest."""
  minimum = 4 if tpu_slices.GENERATIONS[generation].dims == 3 else 1
  cores = tpu_slices.GENERATIONS[generation].cores_per_chip
  for chips in (1, 2, 4, 8, 16, 32, 64):
    if chips < minimum:
      continue
    spec = tpu_slices.parse(f"{generation}-{chips * cores}")
    fit = fits_with(name, spec)
    if fit is not None:
      return spec.name, fit[0], fit[1]["peak_bytes"] / 2**30
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--topology", default="v4-128")
  parser.add_argument("--smallest", default="", help="generations to search, e.g. v4,v5p")
  args = parser.parse_args()
  if not tpu_slices.libtpu_available():
    sys.exit(tpu_slices.INSTALL_HINT)
  tpu_slices.prepare_environment()
  import jax  # lazy: reads JAX_PLATFORMS on import, which prepare_environment sets

  jax.config.update("jax_enable_compilation_cache", False)
  names = args.configs.split(",")
  if args.smallest:
    print(
        "| config | "
        + " | ".join(f"smallest {g} slice (grad_accum_steps)" for g in args.smallest.split(","))
        + " |"
    )
    print("|---|" + "---|" * len(args.smallest.split(",")))
    for name in names:
      cells = []
      for generation in args.smallest.split(","):
        found = smallest(name, generation)
        cells.append(f"{found[0]} ({found[1]}; {found[2]:.1f} GiB)" if found else "none")
      print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return
  spec = tpu_slices.parse(args.topology)
  print(
      f"{spec.name}: {spec.chips} chips ({spec.topology}), "
      f"{spec.generation.hbm_bytes / 2**30:.0f} GiB HBM and "
      f"{spec.generation.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s per chip"
  )
  print(
      "| config | global batch | mesh, grad_accum_steps | per chip: arguments / temporaries / "
      "total | HBM free | model / hardware TFLOP per chip per step | at 40% MFU | paper | "
      "compile |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name in names:
    start = time.perf_counter()
    numbers = compile_for(name, spec)
    if numbers is None:
      print(
          f"| {name} | | | does not fit ({time.perf_counter() - start:.0f} s) | | | | | |",
          flush=True,
      )
    else:
      print(row(name, spec, numbers), flush=True)


if __name__ == "__main__":
  main()
