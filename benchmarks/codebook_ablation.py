"""Codebook ablation (paper Table: lookup dimension x l2-normalisation) on the embedded data.

Trains the quickstart tokenizer with each quantizer setting for the same number of steps and
prints codebook usage over the whole eval split, the paper's per-256-image usage, perplexity
and PSNR:

  python benchmarks/codebook_ablation.py [--steps 600]

The paper (ViT-VQGAN Base-Base, ImageNet) finds l2-normalised low-dimensional codes use ~96%
of the codebook while 256-d codes use 4% and un-normalised 32-d codes 2%.
"""

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from vim_jax import main as vim_main  # noqa: E402

SETTINGS = [  # (code_dim, l2_normalize)
    (4, True),
    (8, True),
    (32, True),
    (128, True),
    (4, False),
    (32, False),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600, help="training steps per setting")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  rows = []
  for code_dim, l2 in SETTINGS:
    config = quickstart.get_config("stage1")
    config.model.update(code_dim=code_dim, l2_normalize=l2)
    config.update(
        total_steps=args.steps,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        log_every=args.steps,
    )
    with tempfile.TemporaryDirectory() as workdir:
      m = vim_main.train(config, workdir).eval_metrics
    rows.append((f"d={code_dim:<4d} l2={'yes' if l2 else 'no '}", m))
    print(f"done: {rows[-1][0]} usage {m['codebook_usage']:.3f}", flush=True)

  print(
      f"\nCodebook ablation: quickstart tokenizer, {args.steps} steps, codebook "
      f"{config.model.codebook_size}, eval on {rows[0][1]['num_images']} images"
  )
  print("| setting | usage (eval set) | usage per 256 images | perplexity | PSNR dB |")
  print("|---|---|---|---|---|")
  for name, m in rows:
    print(
        f"| {name} | {100 * m['codebook_usage']:.1f}% | {100 * m['codebook_usage_per_256']:.1f}% "
        f"| {m['perplexity']:.1f} | {m['psnr']:.2f} |"
    )


if __name__ == "__main__":
  main()
