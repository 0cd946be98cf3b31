"""Every command README.md and launch/README.md show, run as written from the root of a scratch
copy of the repository, relative paths and all, at tiny size (issue 26: a relative workdir once
reached orbax, which refuses one, and every test had used absolute temporary paths).

`PLAN` lists each command the READMEs show (tests/readme_commands.py reads them) with what
this suite does with it: RUN here (the README's text with the few edits that make it tiny and
point it at files made here), COVERED by a named test that reads the same README command, or
LEFT OUT with the reason. A README command missing from PLAN, or a PLAN entry no README shows,
fails `test_every_readme_command_is_planned`: edit one, and the other must follow.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import readme_commands
import run_files
from conftest import REPO_ROOT


@dataclasses.dataclass(frozen=True)
class Run:
  """Run here: the README text with `edits` (old -> new substrings) and `extra` flags."""

  edits: tuple[tuple[str, str], ...] = ()
  extra: tuple[str, ...] = ()
  writes: tuple[str, ...] = ()  # globs (relative to the repository root) it must create


@dataclasses.dataclass(frozen=True)
class Covered:
  test: str  # a test that runs this README command, read from README.md


@dataclasses.dataclass(frozen=True)
class LeftOut:
  reason: str


TINY_VIM = (("configs/vim_base.py", "configs/vim_base.py:tiny"),)

# In the order they run: later commands read what earlier ones wrote (the classifier, the
# converted Inception weights, the imported tokenizer).
PLAN = {
    "python -m vim_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart": Covered(
        "tests/test_quickstart.py (the README's whole quickstart line, read from it, "
        "with :smoke)"
    ),
    "python -m vim_jax.main --config=configs/classifier.py --workdir=workdirs/classifier": Run(
        extra=("--config.total_steps=4", "--config.num_eval_images=32"),
        writes=("workdirs/classifier/checkpoints/4", "workdirs/classifier/config.json"),
    ),
    "python -m vim_jax.sample --workdir=workdirs/vim --num_samples=64 --classes=0,3 "
    "--temperature=1.0 --top_k=0 --top_p=1.0 --guidance_scale=1.0 "
    "--classifier_workdir=workdirs/classifier --acceptance=0.5": Run(
        edits=(("--num_samples=64", "--num_samples=8"),),
        writes=("workdirs/vim/samples/samples.png", "workdirs/vim/samples/results.json"),
    ),
    "python -m vim_jax.probe --workdir=workdirs/vim --blocks=10,24": Run(
        edits=(("--blocks=10,24", "--blocks=1,2"),), writes=("workdirs/vim/probe.json",)
    ),
    "python -m vim_jax.tools.convert_lpips "
    "--vgg16=$HOME/.cache/torch/hub/checkpoints/vgg16-397923af.pth --lpips_head=$(python -c "
    '"import lpips, os; print(os.path.join(os.path.dirname(lpips.__file__), '
    "'weights/v0.1/vgg.pth'))\") --output=weights/lpips_vgg16_v0.1.msgpack":
    # The lpips package only locates its head file; a random one in its layout stands in.
    Run(
        edits=(
            (
                '$(python -c "import lpips, os; print(os.path.join(os.path.dirname('
                "lpips.__file__), 'weights/v0.1/vgg.pth'))\")",
                "lpips_head_vgg.pth",
            ),
        ),
        writes=("weights/lpips_vgg16_v0.1.msgpack",),
    ),
    "python -m vim_jax.tools.convert_inception --pth=pt_inception-2015-12-05-6726825d.pth "
    "--output=weights/pt_inception-2015-12-05.msgpack": Run(
        writes=("weights/pt_inception-2015-12-05.msgpack",)
    ),
    "python -m vim_jax.evaluate --workdir=workdirs/vitvq_base": Covered(
        "tests/test_evaluate.py::test_stage1_evaluate_cli_writes_every_metric (from "
        "a scratch repository root, read from README.md, every value recomputed)"
    ),
    "python -m vim_jax.evaluate --workdir=workdirs/vim_large "
    "--reference_stats=VIRTUAL_imagenet256_labeled.npz --num_samples=50000 "
    "--classifier_workdir=workdirs/classifier --acceptance=0.5": Covered(
        "tests/test_evaluate.py::test_vim_step_evaluate_cli_with_and_without_rejection "
        "(from a scratch repository root, read from README.md, every value "
        "recomputed)"
    ),
    "python -m vim_jax.tools.import_enhancing --ckpt=imagenet_vitvq_base.ckpt "
    "--config=configs/enhancing_vitvq_base.py --workdir=workdirs/enhancing_base": Run(
        edits=(("configs/enhancing_vitvq_base.py", "configs/enhancing_vitvq_base.py:tiny"),),
        writes=("workdirs/enhancing_base/config.json",),
    ),
    "python -m vim_jax.evaluate --workdir=workdirs/enhancing_base": Run(
        extra=("--batch_size=16", "--num_images=16"),
        writes=("workdirs/enhancing_base/eval/results_*.json",),
    ),
    "python -m vim_jax.main --config=configs/vim_base.py "
    "--config.tokenizer_workdir=workdirs/enhancing_base --workdir=workdirs/vim_on_enhancing": Run(
        edits=TINY_VIM,
        extra=("--config.image_size=64", "--config.total_steps=2"),
        writes=("workdirs/vim_on_enhancing/checkpoints/2",),
    ),
    "python -m vim_jax.compile_report --config=configs/vim_large.py --topology=v4-128 "
    "--tokenizer_config=configs/vitvq_base.py": Covered(
        "tests/test_compile_report.py::test_tiny_configs_compile_for_a_v4_8_and_print_"
        "the_compiled_analysis (read from README.md, :tiny on a v4-8, from the "
        "repository root, every printed number checked)"
    ),
    "python -m vim_jax.tools.prepare_data --name=imagenet2012 --data_dir=/mnt/disk/tfds": Covered(
        "tests/conftest.py::fake_imagenet (the same command with a relative "
        "$TFDS_DATA_DIR, read from README.md)"
    ),
    "python -m vim_jax.main ... --config.data.data_dir=gs://my-bucket/tensorflow_datasets": LeftOut(
        "a gs:// bucket (no object store here yet; issue 28), and `...` stands for a "
        "whole training command"
    ),
    "python -m vim_jax.main --config=configs/vitvq_base.py --workdir=$WORKDIR "
    "--config.data.source=folder --config.data.folder=/path/to/images": Run(
        edits=(
            ("configs/vitvq_base.py", "configs/vitvq_base.py:tiny"),
            ("/path/to/images", "my_images"),
        ),
        extra=("--config.total_steps=2", "--config.eval_every=2"),
        writes=("workdirs/folder_run/checkpoints/2",),
    ),
    "python -m vim_jax.tools.prepare_data --name=imagenet2012 --data_dir=$TFDS_DATA_DIR": Covered(
        "tests/conftest.py::fake_imagenet (run from its folder, "
        "TFDS_DATA_DIR=tfds, read from README.md)"
    ),
    "python -m vim_jax.main --config=configs/vitvq_base.py --workdir=$WORKDIR "
    "--config.data.data_dir=$TFDS_DATA_DIR": Covered(
        "tests/test_prepare_data.py::test_train_and_evaluate_on_the_prepared_archives "
        "(run from its folder, WORKDIR=run, TFDS_DATA_DIR=tfds, read from README.md)"
    ),
    "python -m vim_jax.main --distributed=on --config=$CONFIG --workdir=$WORKDIR": LeftOut(
        "needs a TPU slice (--distributed=on finds the coordinator through the TPU "
        "metadata); tests/test_launch.py checks that launch/worker_train.sh issues "
        "exactly this line, and tests/test_multihost.py runs main on several processes "
        "with --coordinator_address"
    ),
}
# What the $VARIABLES of the READMEs stand for here (relative, as a user's would be).
README_VARIABLES = {"WORKDIR": "workdirs/folder_run", "TFDS_DATA_DIR": "tfds"}


def readme_commands_shown() -> list[str]:
  return [c for readme in readme_commands.READMES for c in readme_commands.commands(readme)]


def test_every_readme_command_is_planned():
  shown = readme_commands_shown()
  unplanned = [c for c in shown if c not in PLAN]
  assert not unplanned, (
      "README commands this suite neither runs nor lists (add each to "
      f"tests/test_readme.py's PLAN): {unplanned}"
  )
  gone = [c for c in PLAN if c not in shown]
  assert not gone, f"PLAN entries no README shows any more (update PLAN): {gone}"
  for command, plan in PLAN.items():
    for old, _ in getattr(plan, "edits", ()):
      assert old in command, f"edit {old!r} does not apply to {command!r}"
    if isinstance(plan, Covered):  # the named test exists
      path, _, name = plan.test.split()[0].partition("::")
      text = open(os.path.join(REPO_ROOT, path), encoding="utf-8").read()
      assert re.search(rf"def {name}\b", text), f"{plan.test} names no test of {path}"


def test_ci_runs_the_readme_quickstart_line_as_written():
  """.ci/run ends with the README's quickstart line, verbatim but for `:smoke`, in a clean
  copy of the repository."""
  ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
  line = readme_commands.quickstart_line().replace(
      "--config=configs/quickstart.py", "--config=configs/quickstart.py:smoke"
  )
  assert line in ci, f"README's quickstart line changed: put `{line}` in .ci/run's quickstart block"


def _lay_out_inputs(
    root: str, tokenizer_dir: str, vim_dir: str, inception_files: dict, lpips_files: dict
) -> None:
  """What the README's commands read, where the README puts it (relative to the root): trained
  runs under workdirs/, the published files' stand-ins in the published layouts."""
  for source, name in ((tokenizer_dir, "vitvq_base"), (vim_dir, "vim")):
    readme_commands.copy_run(source, root, name)
  shutil.copy(inception_files["pth"], os.path.join(root, "pt_inception-2015-12-05-6726825d.pth"))
  hub = os.path.join(root, "home/.cache/torch/hub/checkpoints")
  os.makedirs(hub)
  shutil.copy(lpips_files["vgg_path"], os.path.join(hub, "vgg16-397923af.pth"))
  shutil.copy(lpips_files["head_path"], os.path.join(root, "lpips_head_vgg.pth"))
  rng = np.random.default_rng(0)
  import torch
  from enhancing_reference import Tokenizer

  torch.save(
      Tokenizer().lightning_checkpoint(step=7), os.path.join(root, "imagenet_vitvq_base.ckpt")
  )
  from PIL import Image

  for label in ("cats", "dogs"):
    os.makedirs(os.path.join(root, "my_images", label))
    for i in range(12):
      pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, "my_images", label, f"{i}.png"))


def test_readme_commands_run_from_the_repository_root(
    tokenizer_dir, vim_dir, inception_files, lpips_files, tmp_path
):
  root = readme_commands.scratch_repository(str(tmp_path))
  _lay_out_inputs(root, tokenizer_dir, vim_dir, inception_files, lpips_files)
  env = run_files.cli_env()  # one device, as a user's shell
  env["HOME"] = os.path.join(root, "home")
  ran = []
  for command, plan in PLAN.items():
    if not isinstance(plan, Run):
      continue
    argv = readme_commands.to_argv(
        command, {**README_VARIABLES, "HOME": "home"}, plan.edits, plan.extra
    )
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    print(f"{time.perf_counter() - start:5.1f} s  {' '.join(argv[1:])}")
    assert proc.returncode == 0, f"{command}\n{' '.join(argv)}\n{proc.stderr[-4000:]}"
    for pattern in plan.writes:
      assert glob.glob(os.path.join(root, pattern)), f"{command} did not write {pattern}"
    ran.append(command)
  # The relative paths were resolved against the root and recorded as absolute.
  config = json.load(open(os.path.join(root, "workdirs/vim_on_enhancing/config.json")))
  assert config["tokenizer_workdir"] == os.path.join(root, "workdirs/enhancing_base")
  assert config["fid"]["inception_weights"] == os.path.join(
      root, "weights/pt_inception-2015-12-05.msgpack"
  )
  samples = np.load(os.path.join(root, "workdirs/vim/samples/samples.npz"))
  assert sorted(set(samples["labels"].tolist())) == [0, 3] and len(samples["labels"]) == 8
  # Nothing was written outside the scratch copy's root by a relative path gone astray.
  assert not os.path.exists(os.path.join(REPO_ROOT, "workdirs", "vim_on_enhancing"))
  print(f"\nran {len(ran)} README commands from {root}")
  assert len(ran) == sum(isinstance(p, Run) for p in PLAN.values())
