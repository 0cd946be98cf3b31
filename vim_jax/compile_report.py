"""Compile a config's train step for a chosen mesh without running it; print per-device memory.

  python -m vim_jax.compile_report --config=configs/vim_large.py \
      --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2 [--num_cpu_devices=8]

Catches out-of-memory layouts before a pod is booked: the state is abstract (no arrays are
allocated), the step is lowered and compiled by XLA for the mesh the config asks for, and
XLA's memory analysis gives each device's arguments (params, optimizer state, batch),
outputs, temporaries (activations, gradients) and their total. `--num_cpu_devices=N` makes N
virtual CPU devices, to check a pod layout on a workstation (XLA's CPU backend compiles the same
sharded program; its temporaries can differ from TPU's, which fuses and rematerialises
differently, so keep a margin). Stage 2 is compiled on pre-tokenized input (the tokenizer is
not part of the step); --tokens_per_image and --codebook_size give the token shapes.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from vim_jax import log_filters


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                  lock_config=True)
  flags.DEFINE_integer("num_cpu_devices", 0, "Make this many virtual CPU devices (XLA host "
                       "platform) before jax starts; 0 = the real devices.")
  flags.DEFINE_integer("tokens_per_image", 1024, "Stage 2: tokens per image (paper: 32 x 32 at "
                       "256 px with patch 8).")
  flags.DEFINE_integer("codebook_size", 8192, "Stage 2: codebook size (paper: 8192).")


def report(config, tokens_per_image: int = 1024, codebook_size: int = 8192) -> dict:
  """Compiles config's train step on the current devices; returns the numbers it prints."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vim_jax import checkpoint, parallel, train_lib

  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.axis_rules(config)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  train_lib.check_divisible(mesh, batch_size=config.batch_size)
  from vim_jax import microbatch
  microbatch.check(config, parallel.data_parallel_size(mesh))
  b = config.batch_size
  if config.trainer == "vitvq":
    from vim_jax import stage1
    from vim_jax.models import lpips as lpips_lib
    models = stage1.build_models(config)
    tx, schedule, disc_tx = stage1.build_optimizers(config)
    init_fn = stage1.make_init_fn(models, tx, disc_tx, config,
                                       parallel.data_parallel_size(mesh))
    step_fn = stage1.make_train_step(models, tx, schedule, disc_tx, config,
                                     parallel.data_parallel_size(mesh))
    batch = {"image": jax.ShapeDtypeStruct((b, config.image_size, config.image_size, 3),
                                           jnp.float32, sharding=batch_sharding)}
    frozen = {}
    if models.lpips is not None:  # shapes only: no weights file is needed to compile
      x = jnp.zeros((1, 32, 32, 3))
      frozen = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), x, x)["params"]
      frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                           sharding=replicated), frozen)
  elif config.trainer == "vim":
    from vim_jax import stage2
    from vim_jax.models import vim as vim_lib
    model = vim_lib.VIM.from_config(config, codebook_size, tokens_per_image)
    tx, schedule = stage2.build_optimizer(config)

    def init_fn(rng):
      n = parallel.data_parallel_size(mesh)
      params = model.init(rng, jnp.zeros((n, tokens_per_image), jnp.int32),
                          jnp.zeros((n,), jnp.int32))["params"]
      return stage2.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params))

    step_fn = stage2.make_train_step(model, None, tx, schedule, config,
                                     parallel.data_parallel_size(mesh))
    batch = {"tokens": jax.ShapeDtypeStruct((b, tokens_per_image), jnp.int32,
                                            sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
    frozen = {}
  else:
    raise ValueError(f"config.trainer={config.trainer!r}; compile_report handles 'vitvq' and "
                     "'vim' configs.")

  with parallel.tracing_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, None), donate_argnums=(0,))
  with parallel.tracing_context(mesh, rules):
    compiled, flops = train_lib.compile_step(jitted, abstract, batch, frozen)
  params = sum(x.size for x in jax.tree.leaves(abstract.params))
  m = compiled.memory_analysis()
  numbers = {"mesh": dict(mesh.shape), "devices": mesh.size, "params": int(params),
             "gflops_per_device": flops / 1e9}
  if m is not None:
    numbers.update({
        "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
        "total_bytes": (m.argument_size_in_bytes + m.output_size_in_bytes +
                        m.temp_size_in_bytes - m.alias_size_in_bytes)})
  numbers["summary"] = train_lib.describe_memory(compiled, "train step")
  numbers["collectives"] = count_collectives(compiled.as_text())
  return numbers


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each cross-device op the compiled HLO holds (async pairs counted once).
  In a data-parallel step, all-to-all and collective-permute mean examples travel between
  devices; the gradient all-reduce is the only traffic needed."""
  import re
  # The op name follows the result shape, which is a tuple with spaces for combined ops.
  found = re.findall(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)
  return {op: found.count(op) for op in COLLECTIVES}


def main(argv):
  log_filters.install()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if FLAGS.num_cpu_devices:
    # Must happen before jax creates its backends (nothing above has touched a device).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={FLAGS.num_cpu_devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  config = FLAGS.config
  numbers = report(config, FLAGS.tokens_per_image, FLAGS.codebook_size)
  gib = lambda key: numbers.get(key, float("nan")) / 2**30
  print(f"config trainer={config.trainer}, {numbers['params'] / 1e6:.1f}M params, global batch "
        f"{config.batch_size}, mesh {numbers['mesh']} on {numbers['devices']} x "
        f"{jax.devices()[0].platform}")
  print(f"per device: arguments {gib('argument_bytes'):.2f} GiB, outputs "
        f"{gib('output_bytes'):.2f} GiB, temporaries {gib('temp_bytes'):.2f} GiB, aliased "
        f"{gib('alias_bytes'):.2f} GiB, total {gib('total_bytes'):.2f} GiB; "
        f"{numbers['gflops_per_device']:.1f} GFLOP per step")
  print("collectives in the compiled step: " +
        ", ".join(f"{op} {n}" for op, n in numbers["collectives"].items()))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
