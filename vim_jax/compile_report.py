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

- `--topology` compiles with the TPU compiler for compile-only devices
  (vim_jax/infra/tpu_slices.py): the memory is the chip's, as a TPU VM would see it, and a layout
  that does not fit in the chip's HBM exits with status 1 and says so.
- `--num_cpu_devices` compiles with XLA's CPU backend. It checks that the sharded program
  builds and which collectives it holds; its memory figures are not a TPU's (the CPU backend
  fuses and schedules differently, and holds far more per device than a TPU chip would).

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
- one decode step compiled on its own (autoregressive.make_decode_step, the loop's body, cache
  donated): XLA's bytes accessed and FLOPs per chip beside the step's floor, the params and the KV
  cache read once. On TPU XLA's count is an upper bound: it counts the whole operand of each async
  slice that prefetches a param into on-chip memory;
- the wall time of 50k samples: ceil(50000 / batch) batches x 1024 steps x floor bytes / the
  chip's HBM bandwidth (the floor), and x MEASURED_FLOOR_RATIO (the sampler's measured ratio
  to the floor), plus the decoder at 40% MFU.

--sample_batch_size counts images over all chips (default: config.sampling.batch_size sequences
per chip); guidance (sampling.guidance_scale != 1) decodes two sequences per image, which
doubles the cache and the step's bytes per image. Numbers: benchmarks/RESULTS.md, "Sampling 50k
images: sizing on TPU".
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vim_jax.infra import config_files, log_filters, tpu_slices


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).", lock_config=True)
  flags.DEFINE_enum(
      "program",
      "train",
      ["train", "sample"],
      "What to compile: the config's "
      "train step, or a stage-2 config's sampler (its decode step and the "
      "tokenizer's decoder) with the wall time of --num_samples images.",
  )
  flags.DEFINE_integer(
      "sample_batch_size",
      0,
      "--program=sample: images per sampling batch "
      "over all chips (global; a multiple of the chip count); guidance "
      "(--config.sampling.guidance_scale != 1) decodes twice as many "
      "sequences. 0 = the config's default: config.sampling.batch_size "
      "sequences per chip.",
  )
  flags.DEFINE_integer(
      "num_samples",
      50_000,
      "--program=sample: images the wall-time estimate is for (50k: the FID protocol).",
  )
  flags.DEFINE_string(
      "topology",
      "",
      "Compile for this Google Cloud TPU slice, e.g. v4-128, "
      "v5p-256, v5e-16 (v5litepod-16), v6e-64; needs libtpu (pip install "
      "'.[tpu]'). Empty: the local devices (or --num_cpu_devices).",
  )
  flags.DEFINE_integer(
      "num_slices",
      1,
      "With --topology: this many slices joined over DCN "
      "(lay the mesh out with --config.mesh.dcn_*).",
  )
  flags.DEFINE_integer(
      "num_cpu_devices",
      0,
      "Make this many virtual CPU devices (XLA host "
      "platform) before jax starts; 0 = the real devices. A structural check: "
      "the memory figures are the CPU backend's, not a TPU's.",
  )
  config_flags.DEFINE_config_file(
      "tokenizer_config",
      None,
      "Stage 2 on images: the "
      "tokenizer's config file (e.g. configs/vitvq_base.py); "
      "default: config.tokenizer_workdir's config.json.",
  )
  flags.DEFINE_integer(
      "tokens_per_image",
      1024,
      "Stage 2 on pre-tokenized shards without a "
      "tokenizer config: tokens per image (paper: 32 x 32).",
  )
  flags.DEFINE_integer(
      "codebook_size",
      8192,
      "Stage 2 on pre-tokenized shards without a tokenizer config: codebook size (paper: 8192).",
  )


def main(argv):
  log_filters.install()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.topology and FLAGS.num_cpu_devices:
    raise app.UsageError("--topology and --num_cpu_devices are two different targets; give one.")
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
    import jax  # lazy: after the flags are read; see below

    jax.config.update("jax_enable_compilation_cache", False)
    devices = tpu_slices.compile_only_devices(spec, FLAGS.num_slices)
  elif FLAGS.num_cpu_devices:
    # Must happen before jax creates its backends (nothing above has touched a device).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
        f"device_count={FLAGS.num_cpu_devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  # lazy: jax starts its backends when these import, which must wait for the environment set
  # above (compile-only TPU devices, or virtual CPU devices).
  from vim_jax.sampling import sampler_report  # lazy: see above
  from vim_jax.trainers import step_report  # lazy: see above

  config = FLAGS.config
  capacity = spec.generation.hbm_bytes if spec else None
  if FLAGS.program == "sample":
    if FLAGS.num_slices != 1:
      raise app.UsageError(
          "--program=sample compiles for one slice (each chip samples on its "
          "own; more slices only divide the batches): drop --num_slices."
      )
    return main_sample(config, spec, devices, capacity, sampler_report)
  try:
    numbers = step_report.report(
        config,
        devices,
        FLAGS.tokens_per_image,
        FLAGS.codebook_size,
        FLAGS.tokenizer_config,
        capacity,
    )
  except step_report.DoesNotFit as e:
    where = (
        f"{FLAGS.num_slices} x {spec.name} ({capacity / 2**30:.0f} GiB per chip)"
        if spec
        else "these devices"
    )
    sys.exit(
        f"error: does not fit: config trainer={config.trainer}, global batch "
        f"{config.batch_size}, mesh {config.mesh.to_dict()} on {where}: {e}\n"
        "To fit: shard the state (--config.mesh.data=1 --config.mesh.fsdp=-1), "
        "rematerialise the blocks (remat_policy='full' in the model's stacks), "
        "accumulate gradients (--config.grad_accum_steps=k), or use a larger slice."
    )
  step_report.print_report(config, numbers, spec, FLAGS.num_slices)


def main_sample(config, spec, devices, capacity, sampler_report):
  FLAGS = flags.FLAGS
  try:
    numbers = sampler_report.sample_report(
        config, devices, FLAGS.sample_batch_size, FLAGS.tokenizer_config, capacity
    )
  except ValueError as e:  # a batch the chips cannot split, a missing tokenizer shape
    sys.exit(f"error: {e}")
  except sampler_report.step_report.DoesNotFit as e:
    where = f"{spec.name} ({capacity / 2**30:.0f} GiB per chip)" if spec else "these devices"
    sys.exit(
        f"error: does not fit: the sampler of config trainer=vim at "
        f"--sample_batch_size={FLAGS.sample_batch_size or 'default'} on {where}: {e}\n"
        "To fit: a smaller --sample_batch_size (or --config.sampling.batch_size, sequences "
        "per chip), or guidance off (--config.sampling.guidance_scale=1 halves the "
        "sequences per image)."
    )
  sampler_report.print_sample_report(numbers, spec, FLAGS.num_samples)


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("config")
  config_files.add_config_roots(sys.argv)  # `from configs import common`, from any folder
  app.run(main)
