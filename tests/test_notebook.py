"""notebooks/evaluate.ipynb runs headless, top to bottom, against tiny runs made by the tests."""

import os
import sys

import nbclient
import nbformat
from conftest import REPO_ROOT


def test_evaluation_notebook_executes(tokenizer_dir, vim_dir, inception_files, monkeypatch):
  monkeypatch.setenv("VIM_NB_TOKENIZER", tokenizer_dir)
  monkeypatch.setenv("VIM_NB_VIM", vim_dir)
  monkeypatch.setenv("VIM_NB_INCEPTION", inception_files["flax"])
  monkeypatch.setenv("VIM_NB_NUM_IMAGES", "16")
  monkeypatch.setenv("VIM_NB_SAMPLES_PER_CLASS", "2")
  nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", "evaluate.ipynb"), as_version=4)
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO_ROOT}}
  ).execute()
  text, images = [], 0
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      text.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
      images += "image/png" in output.get("data", {})
  text = "\n".join(text)
  assert images == 3  # reconstructions, token maps, samples
  assert "tokenizer: step 4" in text and "VIM: step 3" in text
  assert "codes used by these 16 images" in text
  assert "PSNR" in text and "rfid_vs_shapes_eval" in text and "(16 images)" in text


def _install_cell_namespace():
  """Runs the notebook's Parameters, auth and install cells outside Colab (where they only
  define things) and returns their namespace."""
  nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", "evaluate.ipynb"), as_version=4)
  namespace = {}
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    exec(compile(cell.source, "<notebook cell>", "exec"), namespace)  # pylint: disable=exec-used
    if "def install_commands" in cell.source:
      return namespace
  raise AssertionError("no install cell")


def test_install_cell_builds_the_pip_command_for_each_runtime(monkeypatch):
  monkeypatch.delenv("VIM_JAX_SOURCE", raising=False)
  ns = _install_cell_namespace()
  assert ns["IN_COLAB"] is False  # so nothing was installed above
  git = "git+https://github.com/someone/vim_jax.git@main"
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  assert ns["install_commands"]("tpu", git) == [pip + ["jax[tpu]==0.10.2", git]]
  assert ns["install_commands"]("gpu", git) == [pip + ["jax[cuda12]==0.10.2", git]]
  assert ns["install_commands"]("cpu", "/content/drive/MyDrive/vim_jax") == [
      pip + ["jax==0.10.2", "/content/drive/MyDrive/vim_jax"]
  ]
  wheel = "gs://bucket/dist/vim_jax-0.1.0-py3-none-any.whl"
  assert ns["install_commands"]("tpu", wheel) == [
      ["gcloud", "storage", "cp", wheel, "/content/vim_jax-0.1.0-py3-none-any.whl"],
      pip + ["jax[tpu]==0.10.2", "/content/vim_jax-0.1.0-py3-none-any.whl"],
  ]
  # The pin is the jax this package is tested with.
  import jax

  assert ns["JAX_VERSION"] == jax.__version__
  monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
  assert ns["runtime_kind"]() == "tpu"
