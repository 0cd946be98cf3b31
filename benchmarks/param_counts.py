"""Parameter counts of the shipped configs next to the paper's (abstract init only).

python benchmarks/param_counts.py
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vim_jax import paper  # noqa: E402
from vim_jax.main import load_config_file  # noqa: E402
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib  # noqa: E402

ROWS = [
    ("SS", "vitvq_small.py", "small", "small"),
    ("BB", "vitvq_base.py", "base", "base"),
    ("SL", "vitvq_large.py", "small", "large"),
]


def main():
  print("| config | encoder (ours / paper) | decoder (ours / paper) | quantizer | total |")
  print("|---|---|---|---|---|")
  for name, file, enc, dec in ROWS:
    config = load_config_file(os.path.join(ROOT, "configs", file))
    model = tokenizer_lib.ViTVQGAN.from_config(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    counts = tokenizer_lib.count_params_by_stack(
        nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
    )
    per_stack = paper.PARAMS_PER_STACK
    print(
        f"| {name} ({file}) | {counts['encoder'] / 1e6:.1f}M / {per_stack[enc] / 1e6:.0f}M "
        f"| {counts['decoder'] / 1e6:.1f}M / {per_stack[dec] / 1e6:.0f}M "
        f"| {counts['quantizer'] / 1e6:.2f}M | {sum(counts.values()) / 1e6:.1f}M |"
    )

  print("\n| config | VIM params (ours / paper) |")
  print("|---|---|")
  for size in ("base", "large"):
    config = load_config_file(os.path.join(ROOT, "configs", f"vim_{size}.py"))
    model = vim_lib.VIM.from_config(config, vocab_size=8192, num_tokens=1024)
    variables = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 1024), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    n = tokenizer_lib.count_params(nn.meta.unbox(variables))
    print(f"| VIM-{size} (vim_{size}.py) | {n / 1e6:.0f}M / {paper.VIM_PARAMS[size] / 1e6:.0f}M |")


if __name__ == "__main__":
  main()
