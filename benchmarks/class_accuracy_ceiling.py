"""Where the quickstart's sample class accuracy is lost: data, tokenizer, or VIM.

  python benchmarks/class_accuracy_ceiling.py --workdir=workdirs/quickstart
      [--classifier_workdir=DIR] [--num_images=480] [--num_samples=240] [--guidance=1,2,3]

For a finished quickstart run (tokenizer/, classifier/, vim/ under --workdir), it prints one
table, every row scored by the same classifier (the run's, or --classifier_workdir):

- real: the eval images themselves (the classifier's own accuracy);
- reconstructions: the same images through the tokenizer (encode, quantize, decode). Samples
  are decoded by the same decoder, so this is about the best that perfect tokens can score;
- VIM as a classifier: argmin over classes c of -log p(tokens | c) on the eval images'
  tokens; how much of the class the VIM's likelihood has learnt;
- samples at each guidance scale (temperature 1, no top-k/top-p), class-balanced.

A gap between rows 1 and 2 is the tokenizer's; between rows 2 and 4, the VIM's.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vim_jax.data import preprocess, shapes, sources  # noqa: E402
from vim_jax.infra import runs
from vim_jax.sampling import autoregressive, generation
from vim_jax.trainers import vim_step

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished quickstart workdir.", required=True)
flags.DEFINE_string(
    "classifier_workdir", "", "Classifier to score with; default WORKDIR/classifier."
)
flags.DEFINE_integer("num_images", 480, "Eval images for the real / reconstruction / VIM rows.")
flags.DEFINE_integer("num_samples", 240, "Class-balanced samples per guidance scale.")
flags.DEFINE_string("guidance", "1,2,3", "Comma-separated guidance scales to sample at.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def eval_images(config, num_images: int):
  """Centre-cropped eval images [N, S, S, 3] in [-1, 1] and their labels [N]."""
  source = sources.build_source(config.data, "eval", config.image_size, config.seed)
  n = min(num_images, len(source))
  examples = [source[i] for i in range(n)]
  images = np.stack(
      [preprocess.preprocess_image(e["image"], config.image_size, None, False) for e in examples]
  )
  return images, np.array([e["label"] for e in examples])


def vim_class_nll(trained, tokens: np.ndarray) -> np.ndarray:
  """Mean -log p(tokens | c) per image, [N, num_classes], from the trainer's own eval step."""
  eval_step = jax.jit(vim_step.make_eval_step(trained.model, trained.tokenizer.model))
  return np.stack(
      [
          np.asarray(
              eval_step(
                  trained.params,
                  {"tokens": tokens, "label": np.full(len(tokens), c, np.int32)},
                  trained.tokenizer.params,
              )["nll"]
          )
          for c in range(trained.model.num_classes)
      ],
      axis=1,
  )


def per_class(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> str:
  return " ".join(f"{np.mean(predicted[labels == c] == c):.2f}" for c in range(num_classes))


def main(_):
  trained = runs.load_vim(os.path.join(FLAGS.workdir, "vim"))
  tok, config = trained.tokenizer, trained.config
  classes = trained.model.num_classes
  if classes == 0:
    raise SystemExit("the VIM is unconditional; class accuracy needs a class-conditional one.")
  classifier, classifier_params = runs.load_classifier(
      FLAGS.classifier_workdir or os.path.join(FLAGS.workdir, "classifier")
  )

  def predict(images_uint8):
    probabilities = generation.class_probabilities(classifier, classifier_params, images_uint8)
    return np.argmax(probabilities, -1)

  images, labels = eval_images(config, FLAGS.num_images)
  out = tok.model.apply({"params": tok.params}, images)  # one pass: reconstructions and tokens
  reconstructions = np.asarray(out["reconstruction"])
  tokens = np.asarray(out["indices"]).reshape(len(images), -1)
  rows = [
      ("real eval images", labels, predict(preprocess.to_uint8(images))),
      ("tokenizer reconstructions", labels, predict(preprocess.to_uint8(reconstructions))),
      (
          "VIM as a classifier (argmin NLL)",
          labels,
          np.argmin(vim_class_nll(trained, tokens), axis=1),
      ),
  ]
  requested = np.resize(np.arange(classes, dtype=np.int32), FLAGS.num_samples)
  for g in (float(s) for s in FLAGS.guidance.split(",")):
    cfg = autoregressive.SamplingConfig(temperature=1.0, guidance_scale=g)
    samples = generation.generate(trained, requested, FLAGS.seed, cfg)
    rows.append((f"samples, guidance {g:g}", requested, predict(samples)))

  print(
      f"workdir {FLAGS.workdir}, VIM step {trained.step}, {len(images)} eval images, "
      f"{FLAGS.num_samples} samples per row"
  )
  names = (
      shapes.CLASS_NAMES[:classes]
      if config.data.source == "shapes"
      else [str(c) for c in range(classes)]
  )
  print(f"| scored | n | class accuracy | per class ({', '.join(names)}) |")
  print("|---|---|---|---|")
  for name, truth, predicted in rows:
    print(
        f"| {name} | {len(truth)} | {np.mean(predicted == truth):.1%} | "
        f"{per_class(predicted, truth, classes)} |"
    )


if __name__ == "__main__":
  app.run(main)
