"""Sampling speed: KV-cached decoding versus recomputing the whole prefix at every step.

  python benchmarks/sampling_speed.py

VIM with the :tiny config's sizes (2 blocks, width 64) and randomly initialised weights (speed
does not depend on them), batch 8, sequences of 64 and 256 tokens, on whatever device JAX
sees. Each sampler is compiled first and then timed over 3 runs (best of 3).
"""

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import vim_base  # noqa: E402
from vim_jax.models import vim as vim_lib  # noqa: E402
from vim_jax.sampling import autoregressive


def best_time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  config = vim_base.get_config("tiny")
  batch = 8
  print(
      f"device: {jax.devices()[0].platform} x {jax.device_count()}, batch {batch}, "
      f"VIM {config.model.num_layers} blocks x width {config.model.width}"
  )
  print("| tokens per image | KV cache tokens/s | full prefix tokens/s | speed-up |")
  print("|---|---|---|---|")
  for num_tokens in (64, 256):
    model = vim_lib.VIM.from_config(config, vocab_size=512, num_tokens=num_tokens)
    params = nn.meta.unbox(
        model.init(
            jax.random.key(0), jnp.zeros((1, num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)
        )
    )["params"]
    labels = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes
    cfg = autoregressive.SamplingConfig(temperature=1.0)
    cached = jax.jit(lambda p, l, r: autoregressive.sample_tokens(model, p, l, r, cfg))
    uncached = jax.jit(
        lambda p, l, r: autoregressive.sample_tokens_without_cache(model, p, l, r, cfg)
    )
    t_cached = best_time(cached, params, labels, jax.random.key(1))
    t_full = best_time(uncached, params, labels, jax.random.key(1))
    n = batch * num_tokens
    print(f"| {num_tokens} | {n / t_cached:,.0f} | {n / t_full:,.0f} | {t_full / t_cached:.1f}x |")


if __name__ == "__main__":
  main()
