"""The KV-cached decode step against its memory floor.

  python benchmarks/decode_floor.py [--layers 8 --width 256 --heads 4 --batch 32 --tokens 1024]

A decode step must read every param and the whole KV cache once (the floor; the attention reads
all cache_length positions, masked or not) and write one position of each layer's K and V.
This times, on whatever device JAX sees:
  sampler  the per-token time of `autoregressive.sample_tokens` (all `--tokens` steps of the
           compiled loop, divided by their number; temperature 1, no top-k);
  floor    a compiled function that reads the same params and a cache of the same size once
           (a sum over every element);
for a VIM with scanned layers (the paper configs' layout) and with unrolled ones. The default
model is sized so that the cache (537 MB) dominates its params (22 MB), as it does for VIM-Base
at sampling batch sizes, and so that memory bounds the step on a CPU: the weight matmuls of a
small width at batch 32 take less time than reading the cache.

It uses only sample_tokens, init_cache and the model, so it also runs against an older
checkout (PYTHONPATH=old_checkout) for a before/after comparison.
"""

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from vim_jax.models import transformer  # noqa: E402
from vim_jax.models import vim as vim_lib  # noqa: E402
from vim_jax.sampling import autoregressive


def median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(args, scan_layers: bool) -> dict:
  stack = transformer.StackConfig(
      num_layers=args.layers,
      width=args.width,
      num_heads=args.heads,
      head_dim=args.head_dim,
      mlp_dim=4 * args.width,
      dropout=0.0,
      causal=True,
      **{**common.stack_kernels(), "scan_layers": scan_layers},
      **common.block_options(),
  )
  model = vim_lib.VIM(
      stack,
      vocab_size=args.vocab,
      num_tokens=args.tokens,
      num_classes=10,
      condition_every_position=False,
      loss_chunk=256,
      dtype=jnp.float32,
  )
  labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
  params = nn.meta.unbox(
      jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, args.tokens), jnp.int32), labels[:1])
  )["params"]
  config = autoregressive.SamplingConfig(temperature=1.0)
  sample = jax.jit(lambda p, l, r: autoregressive.sample_tokens(model, p, l, r, config))
  step = median_time(sample, params, labels, jax.random.key(1), repeats=args.repeats) / args.tokens
  cache = autoregressive.init_cache(model, args.batch)
  read_once = jax.jit(lambda tree: [jnp.sum(x) for x in jax.tree.leaves(tree)])
  floor = median_time(read_once, (params, cache), repeats=10)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return {
      "layout": "scanned" if scan_layers else "unrolled",
      "step": step,
      "floor": floor,
      "params_mb": nbytes(params) / 1e6,
      "cache_mb": nbytes(cache) / 1e6,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32, help="sequences decoded at once")
  parser.add_argument("--tokens", type=int, default=1024, help="tokens per image (cache length)")
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3, help="timed sampler runs (median)")
  parser.add_argument("--layouts", default="scanned,unrolled")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(
      f"device: {device.platform} ({device.device_kind}) x 1; VIM {args.layers} layers, width "
      f"{args.width}, {args.heads} x {args.head_dim} heads, batch {args.batch}, "
      f"{args.tokens} tokens"
  )
  print("| layers | params MB | cache MB | sampler ms/token | floor ms | ratio | tokens/s |")
  print("|---|---|---|---|---|---|---|")
  for layout in args.layouts.split(","):
    r = measure(args, scan_layers=layout == "scanned")
    print(
        f"| {r['layout']} | {r['params_mb']:.0f} | {r['cache_mb']:.0f} | "
        f"{r['step'] * 1e3:.2f} | {r['floor'] * 1e3:.2f} | {r['step'] / r['floor']:.2f}x | "
        f"{args.batch / r['step']:,.0f} |"
    )


if __name__ == "__main__":
  main()
