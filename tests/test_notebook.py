"""notebooks/evaluate.ipynb runs headless, top to bottom, against tiny runs made by the tests."""

import os

import pytest

from conftest import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_evaluation_notebook_executes(tokenizer_dir, vim_dir, inception_files, monkeypatch):
  monkeypatch.setenv("VIM_NB_TOKENIZER", tokenizer_dir)
  monkeypatch.setenv("VIM_NB_VIM", vim_dir)
  monkeypatch.setenv("VIM_NB_INCEPTION", inception_files["flax"])
  monkeypatch.setenv("VIM_NB_NUM_IMAGES", "16")
  monkeypatch.setenv("VIM_NB_SAMPLES_PER_CLASS", "2")
  nb = nbformat.read(os.path.join(REPO_ROOT, "notebooks", "evaluate.ipynb"), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO_ROOT}}).execute()
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
