"""Shipped configs: they build, have the paper's sizes, and misspelt overrides fail clearly."""

import glob
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import REPO_ROOT

from vim_jax import paper
from vim_jax.main import load_config_file
from vim_jax.models import classifier as classifier_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith(("__init__.py", "common.py"))]
STAGE1 = {
    "vitvq_small.py": ("small", "small"),
    "vitvq_base.py": ("base", "base"),
    "vitvq_large.py": ("small", "large"),
}


def _abstract_counts(config):
  """Parameter counts from an abstract init (no memory), for any trainer's config."""
  if config.trainer == "quickstart":
    counts = {f"stage1_{k}": v for k, v in _abstract_counts(config.stage1).items()}
    counts.update(
        classifier=_abstract_counts(config.classifier)["classifier"],
        vim=_abstract_counts(config.stage2)["vim"],
    )
    return counts
  if config.trainer == "classifier":
    model = classifier_lib.ConvClassifier(6, tuple(config.model.widths))
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return {
        "classifier": tokenizer_lib.count_params(
            jax.eval_shape(model.init, jax.random.key(0), images)
        )
    }
  if config.trainer == "vim":
    grid = config.image_size // (4 if config.image_size == 32 else 8)
    model = vim_lib.VIM.from_config(config, vocab_size=8192, num_tokens=grid * grid)
    tokens = jax.ShapeDtypeStruct((1, grid * grid), jnp.int32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens, labels)
    return {"vim": tokenizer_lib.count_params(nn.meta.unbox(variables))}
  model = tokenizer_lib.ViTVQGAN.from_config(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return tokenizer_lib.count_params_by_stack(nn.meta.unbox(variables))


# Every config with no variant, and the :tiny variant of each config that has one.
CONFIG_ARGS = [p for p in CONFIGS] + [
    p + ":tiny" for p in CONFIGS if os.path.basename(p).startswith(("vitvq", "vim"))
]
CONFIG_ARGS += [p + ":stage1" for p in CONFIGS if p.endswith("quickstart.py")]


@pytest.mark.parametrize("spec", CONFIG_ARGS, ids=os.path.basename)
def test_every_config_builds_abstractly(spec):
  path, _, variant = spec.partition(":")
  name = os.path.basename(path)
  config = load_config_file(path + (f":{variant}" if variant else ""))
  counts = _abstract_counts(config)
  print(f"{name}:{variant or ''} parameters {counts}")
  assert all(v > 0 for v in counts.values())
  if config.trainer != "tokenizer":
    return
  assert counts["encoder"] > 0 and counts["decoder"] > 0
  assert counts["quantizer"] == config.model.codebook_size * config.model.code_dim


@pytest.mark.parametrize("name", sorted(STAGE1))
def test_paper_sizes_and_parameter_counts(name):
  config = load_config_file(os.path.join(REPO_ROOT, "configs", name))
  enc, dec = STAGE1[name]
  assert (config.image_size, config.model.patch_size) == (256, 8)
  assert (config.model.codebook_size, config.model.code_dim, config.model.beta) == (8192, 32, 0.25)
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.peak_lr) == (0.9, 0.99, 1e-4)
  assert (config.optimizer.warmup_steps, config.optimizer.end_lr) == (50_000, 5e-5)
  assert (config.batch_size, config.total_steps, config.data.name) == (256, 500_000, "imagenet2012")
  assert (paper.vit_size_of(config.model.encoder), paper.vit_size_of(config.model.decoder)) == (
      enc,
      dec,
  )
  counts = _abstract_counts(config)
  # The paper's counts (32M / 91M / 599M) are per stack.
  for stack, size in (("encoder", enc), ("decoder", dec)):
    reported = paper.PARAMS_PER_STACK[size]
    assert abs(counts[stack] - reported) / reported < 0.15, (stack, counts[stack], reported)


# The paper's stage-1 objective and optimizer. Reported by secondary summaries [paper?]: the
# loss weights (L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-Laplace + 1.0 L_2), Adam
# 0.9 / 0.99 for G and D, decoupled weight decay 1e-4, a non-saturating GAN with R1 trained
# from step 0. Stated [paper]: beta 0.25, l2-normalized 32-d codes, the output FFNs. Ours
# [choice]: R1 gamma 10 (StyleGAN2's), logit-Laplace eps 0.1 (DALL-E's), D's constant lr 1e-4.
PAPER_STAGE1 = {
    "loss": dict(l2=1.0, logit_laplace=0.1, vq=1.0, perceptual=0.1, adversarial=0.1),
    "optimizer": dict(b1=0.9, b2=0.99, weight_decay=1e-4),
    "discriminator": dict(
        loss="non_saturating", r1_gamma=10.0, start_step=0, b1=0.9, b2=0.99, lr=1e-4
    ),
    "model": dict(
        beta=0.25,
        l2_normalize=True,
        code_dim=32,
        logit_laplace=True,
        logit_laplace_eps=0.1,
        position_embedding="learned",
        output_ffn=True,
    ),
}


@pytest.mark.parametrize("name", sorted(STAGE1))
def test_paper_objective_and_optimizer(name):
  """Every stage-1 config has the paper's loss weights, weight decay, GAN settings and
  quantizer; `:noperceptual` (the tokenizer for linear probes) differs only in dropping
  LPIPS."""
  path = os.path.join(REPO_ROOT, "configs", name)
  config = load_config_file(path)
  for section, expected in PAPER_STAGE1.items():
    assert {k: config[section][k] for k in expected} == expected, section
  assert set(config.loss) == set(PAPER_STAGE1["loss"])  # no other term in the objective
  probe = load_config_file(path + ":noperceptual")
  assert probe.loss.to_dict() == {**PAPER_STAGE1["loss"], "perceptual": 0.0}
  assert probe.to_dict() == {**config.to_dict(), "loss": probe.loss.to_dict()}


@pytest.mark.parametrize("size", ["base", "large"])
def test_vim_paper_sizes_and_parameter_counts(size):
  config = load_config_file(os.path.join(REPO_ROOT, "configs", f"vim_{size}.py"))
  expected = paper.VIM_SIZES[size]
  assert {k: config.model[k] for k in expected} == expected
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.peak_lr) == (0.9, 0.96, 4.5e-4)
  assert (config.optimizer.warmup_steps, config.optimizer.decay_start) == (5000, 80_000)
  assert (config.optimizer.end_lr, config.batch_size, config.model.dropout) == (1e-5, 1024, 0.1)
  assert (config.total_steps, config.optimizer.weight_decay) == (450_000, 0.0)  # none stated
  # Not the paper's (it trains without guidance): the class dropped 10% of the time, as
  # classifier-free guidance's authors do, so that sampling can use guidance_scale > 1.
  assert config.label_dropout == 0.1
  count = _abstract_counts(config)["vim"]
  reported = paper.VIM_PARAMS[size]
  print(f"VIM-{size}: {count / 1e6:.0f}M parameters (paper {reported / 1e6:.0f}M)")
  assert abs(count - reported) / reported < 0.10
  assert config.probe.block == paper.PROBE_BLOCK[size]


@pytest.mark.parametrize("size", ["base", "large"])
def test_sampling_batch_is_sequences_per_chip(size):
  """config.sampling.batch_size counts sequences decoded per chip (what fills its memory: the
  KV cache); with guidance each image is two, so the global batch of images halves."""
  from vim_jax.trainers import vim_step

  config = load_config_file(os.path.join(REPO_ROOT, "configs", f"vim_{size}.py"))
  per_chip = config.sampling.batch_size
  assert per_chip % 2 == 0
  assert vim_step.sampling_batch_size(config, 64) == 64 * per_chip  # a v4-128
  config.sampling.guidance_scale = 2.0
  assert vim_step.sampling_batch_size(config, 64) == 64 * per_chip // 2
  config.model.num_classes = 0  # unconditional: no null-class half to decode
  assert vim_step.sampling_batch_size(config, 4) == 4 * per_chip


FACES = {"celebahq": ("celeb_a_hq", "tfds"), "ffhq": ("ffhq", "folder")}


@pytest.mark.parametrize("key", sorted(FACES))
def test_face_configs_are_the_imagenet_recipes_without_classes(key):
  """CelebA-HQ and FFHQ (paper: rFID 4.66 / 3.13, unconditional FID 7.0 / 5.3): the BB tokenizer
  and VIM-Base recipes with their own data, split as taming-transformers' VQGAN (CelebA-HQ
  25k / 5k, FFHQ 60k / 10k by its list of eval files), and an unconditional VIM."""
  dataset, source = FACES[key]
  assert paper.RFID[dataset] > 0 and paper.UNCONDITIONAL_FID[dataset] > 0
  tokenizer = load_config_file(os.path.join(REPO_ROOT, "configs", f"vitvq_{key}.py"))
  imagenet = load_config_file(os.path.join(REPO_ROOT, "configs", "vitvq_base.py"))
  assert tokenizer.image_size == 256 and tokenizer.data.source == source
  assert {**tokenizer.to_dict(), "data": None} == {**imagenet.to_dict(), "data": None}
  vim = load_config_file(os.path.join(REPO_ROOT, "configs", f"vim_{key}.py"))
  vim_imagenet = load_config_file(os.path.join(REPO_ROOT, "configs", "vim_base.py"))
  assert (vim.model.num_classes, vim.label_dropout) == (0, 0.0)
  assert vim.data.to_dict() == tokenizer.data.to_dict()
  differ = {"data": None, "label_dropout": None}
  assert {**vim.to_dict(), **differ, "model": {**vim.model.to_dict(), "num_classes": None}} == {
      **vim_imagenet.to_dict(),
      **differ,
      "model": {**vim_imagenet.model.to_dict(), "num_classes": None},
  }
  if source == "tfds":
    assert (tokenizer.data.name, tokenizer.data.train_split, tokenizer.data.eval_split) == (
        "celeb_a_hq/256",
        "train[:25000]",
        "train[25000:]",
    )
    assert tokenizer.data.label_key == ""  # the dataset has no labels
  else:
    # Both paths are the user's: the folder of 70k images and taming's ffhqvalidation.txt.
    assert (tokenizer.data.folder, tokenizer.data.folder_eval_list) == ("", "")
  assert (
      load_config_file(os.path.join(REPO_ROOT, "configs", f"vim_{key}.py:tiny")).model.num_classes
      == 0
  )


def test_stage1_key_was_vitvq():
  """Stage 1's trainer key is 'tokenizer'; configs and workdirs written before say 'vitvq',
  which main still accepts and runs read as 'tokenizer'."""
  from vim_jax import main
  from vim_jax.infra import runs

  assert main.TRAINERS["vitvq"] == main.TRAINERS["tokenizer"]
  assert runs.RENAMED_TRAINERS == {"vitvq": "tokenizer"}


def _run_main(args, timeout=300):
  from run_files import cli_env

  return subprocess.run(
      [sys.executable, "-m", "vim_jax.main", *args],
      cwd=REPO_ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def test_misspelt_override_fails_listing_valid_keys(tmp_path):
  proc = _run_main(
      [
          "--config=configs/vitvq_base.py:tiny",
          f"--workdir={tmp_path}",
          "--config.model.codebok_size=16",
      ]
  )
  assert proc.returncode != 0
  assert "unknown config key 'model.codebok_size'" in proc.stderr
  assert "'codebook_size'" in proc.stderr and "'code_dim'" in proc.stderr


def test_unknown_variant_fails():
  with pytest.raises(ValueError, match="variant 'huge'"):
    load_config_file(os.path.join(REPO_ROOT, "configs", "vitvq_base.py:huge"))


def _event_tags(workdir):
  import tensorflow as tf

  tags = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_granules_group_devices_by_slice_then_process():
  from types import SimpleNamespace as D

  from vim_jax.infra import parallel

  by_slice = [D(id=i, slice_index=i // 2, process_index=i // 4) for i in range(8)]
  assert [[d.id for d in g] for g in parallel.granules(by_slice)] == [
      [0, 1],
      [2, 3],
      [4, 5],
      [6, 7],
  ]
  by_process = [D(id=i, slice_index=None, process_index=i % 2) for i in range(4)]
  assert [[d.id for d in g] for g in parallel.granules(by_process)] == [[0, 2], [1, 3]]


def test_dcn_mesh_needs_as_many_slices_as_asked():
  import jax
  import pytest

  from vim_jax.infra import parallel

  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ValueError, match="uses 2 slices \\(or hosts\\) but 1 are available"):
    parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1, dcn_data=2, dcn_fsdp=1, dcn_tensor=1))


def test_granules_fall_back_to_processes_within_one_slice():
  from types import SimpleNamespace as D

  from vim_jax.infra import parallel

  one_slice = [D(id=i, slice_index=0, process_index=i // 2) for i in range(4)]
  assert [[d.id for d in g] for g in parallel.granules(one_slice)] == [[0, 1], [2, 3]]
