"""Stage-1 objective: quality and step time of L2-only, the reconstruction losses, and the full
objective (+ LPIPS perceptual + StyleGAN adversarial), on the embedded data.

  python benchmarks/stage1_objective.py [--steps 600]

LPIPS here uses *random* VGG16/LPIPS weights in the published layouts, converted with the real
converter (the real weights cannot be downloaded on our machines): its values only check
self-consistency, not perceptual quality. The step time is measured by the trainer (wall time
per step between log points, after compilation).
"""

import argparse
import logging
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from vim_jax import main as vim_main  # noqa: E402
from vim_jax.models import lpips  # noqa: E402
from vim_jax.tools import convert_lpips, weights_io  # noqa: E402


def random_lpips_weights(path: str, seed: int = 0):
  """Random weights in the published key layouts, converted with the real converter."""
  rng = np.random.default_rng(seed)
  vgg, cin = {}, 3
  for layer in lpips.VGG16_LAYOUT:
    if layer == "M":
      continue
    index, cout = layer
    vgg[f"features.{index}.weight"] = (
        rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))
    ).astype(np.float32)
    vgg[f"features.{index}.bias"] = np.zeros(cout, np.float32)
    cin = cout
  head = {
      f"lin{k}.model.1.weight": rng.uniform(size=(1, c, 1, 1)).astype(np.float32)
      for k, c in enumerate(lpips.TAP_CHANNELS)
  }
  weights_io.save_params(convert_lpips.convert(vgg, head), path)


FULL = dict(l2=1.0, vq=1.0, logit_laplace=0.1, perceptual=0.1, adversarial=0.1)
# name -> (config.loss, config.discriminator overrides)
SETTINGS = {
    "L2 + VQ": (dict(FULL, logit_laplace=0.0, perceptual=0.0, adversarial=0.0), {}),
    "L2 + logit-Laplace + VQ": (dict(FULL, perceptual=0.0, adversarial=0.0), {}),
    "full (+0.1 LPIPS +0.1 adversarial)": (FULL, {}),
    "full, adaptive adversarial weight": (FULL, dict(adaptive_weight=True)),
    "+0.1 adversarial only": (dict(FULL, perceptual=0.0), {}),
    "+0.1 adversarial only, adaptive weight": (
        dict(FULL, perceptual=0.0),
        dict(adaptive_weight=True),
    ),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument(
      "--only",
      default="",
      help="comma-separated row numbers (0-based) to run; "
      f"default all of {list(enumerate(SETTINGS))}",
  )
  args = parser.parse_args()
  chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(SETTINGS))
  settings = [list(SETTINGS.items())[i] for i in chosen]
  logging.basicConfig(level=logging.WARNING)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "lpips_random.msgpack")
    random_lpips_weights(weights)
    for name, (loss, disc) in settings:
      config = quickstart.get_config("stage1")
      config.loss.update(**loss)
      config.discriminator.update(**disc)
      config.model.logit_laplace = loss["logit_laplace"] > 0
      config.update(
          total_steps=args.steps,
          eval_every=args.steps,
          checkpoint_every=args.steps,
          log_every=max(args.steps // 6, 1),
          perceptual_weights=weights,
      )
      result = vim_main.train(config, os.path.join(tmp, str(len(rows))))
      # Skip the first log window: it includes compilation.
      times = [1 / m["steps_per_sec"] for m in result.train_metrics[1:]]
      rows.append((name, result.eval_metrics, float(np.median(times))))
      print(f"done: {name}: PSNR {result.eval_metrics['psnr']:.2f}", flush=True)
  base_time = rows[0][2]  # the first row run is the time reference
  print(
      f"\nStage-1 objective on the embedded shapes data (quickstart model, {args.steps} steps, "
      f"batch {config.batch_size}, {config.image_size}px, 2-core CPU)"
  )
  print("| objective | PSNR dB | SSIM | LPIPS (random weights) | usage | step time ms | vs L2 |")
  print("|---|---|---|---|---|---|---|")
  for name, m, t in rows:
    print(
        f"| {name} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['lpips']:.4f} | "
        f"{100 * m['codebook_usage']:.1f}% | {1000 * t:.1f} | {t / base_time:.2f}x |"
    )


if __name__ == "__main__":
  main()
