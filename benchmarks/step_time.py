"""Train-step time of the quickstart's tokenizer and VIM, with the stack's kernel settings.

  python benchmarks/step_time.py [--steps 30] [--repeats 3]

Builds each step with the trainers' own functions (vim_jax.trainers.tokenizer_step /
vim_jax.trainers.vim_step) on the quickstart configs, runs it on fixed random batches on the
default devices, and prints a table of milliseconds per step (median of --repeats timed runs of
--steps steps, after a compile and a warm-up step) for unrolled and scanned layers. Run it on an
otherwise idle machine.
"""

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from vim_jax.models import vim as vim_lib  # noqa: E402
from vim_jax.trainers import tokenizer_step, vim_step


def stage1_step(config):
  models = tokenizer_step.build_models(config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(config)
  state = nn.meta.unbox(
      jax.jit(tokenizer_step.make_init_fn(models, tx, disc_tx, config, 1))(jax.random.key(0))
  )
  step = jax.jit(
      tokenizer_step.make_train_step(models, tx, schedule, disc_tx, config), donate_argnums=(0,)
  )
  s = config.image_size
  batch = {
      "image": jax.random.uniform(
          jax.random.key(1), (config.batch_size, s, s, 3), minval=-1, maxval=1
      )
  }
  return step, state, batch


def stage2_step(config, tokens_per_image=64, codebook_size=512):
  model = vim_lib.VIM.from_config(config, codebook_size, tokens_per_image)
  tx, schedule = vim_step.build_optimizer(config)
  params = nn.meta.unbox(
      model.init(
          jax.random.key(0), jnp.zeros((1, tokens_per_image), jnp.int32), jnp.zeros((1,), jnp.int32)
      )
  )["params"]
  state = vim_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  step = jax.jit(vim_step.make_train_step(model, None, tx, schedule, config), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {
      "tokens": jnp.asarray(
          rng.integers(0, codebook_size, (config.batch_size, tokens_per_image)), jnp.int32
      ),
      "label": jnp.asarray(rng.integers(0, 6, (config.batch_size,)), jnp.int32),
  }
  return step, state, batch


def time_step(step, state, batch, steps, repeats) -> float:
  state, metrics = step(state, batch, {})  # compile and warm up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch, {})
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
  print("| model | batch | scan_layers | ms / step |\n|---|---|---|---|")
  for name, make_config, build in (
      ("tokenizer", quickstart.stage1_config, stage1_step),
      ("VIM", quickstart.stage2_config, stage2_step),
  ):
    for scan in (False, True):
      config = make_config()
      stacks = (
          (config.model.encoder, config.model.decoder) if name == "tokenizer" else (config.model,)
      )
      for stack in stacks:
        stack.scan_layers = scan
      ms = time_step(*build(config), args.steps, args.repeats)
      print(f"| quickstart {name} | {config.batch_size} | {scan} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
  main()
