"""What loading a trained tokenizer costs: the whole train state versus params only.

  python benchmarks/run_loading.py [--config=configs/vitvq_base.py] [--workdir=EXISTING_RUN]

Without --workdir it writes a stage-1 run of the config at init (params, both Adam states and
the discriminator, as the trainer checkpoints them) into a temporary folder. Each loader then
runs in a fresh process and reports the time, the peak RSS of the load (VmHWM, reset just
before it; Linux) and the RSS it leaves:
- `full state`: restore the whole train state and keep its params (the baseline);
- `runs.load_tokenizer`: the params (or EMA params) only, decoder included;
- `without decoder`: encoder and codebook only (enough to tokenize, as stage 2 does).
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from vim_jax.infra import checkpoint, fileio  # noqa: E402
from vim_jax.main import load_config_file  # noqa: E402
from vim_jax.trainers import tokenizer_step  # noqa: E402

LOADER = r"""
import sys, time
import flax.linen as nn
import jax
workdir, mode = sys.argv[1], sys.argv[2]
from vim_jax.infra import checkpoint, fileio, runs
from vim_jax.trainers import tokenizer_step
jax.block_until_ready(jax.numpy.zeros(3))
def status(key):  # MiB
  return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmHWM")
start = time.perf_counter()
if mode == "full state":
  config = runs.read_run_config(workdir, "tokenizer")
  models = tokenizer_step.build_models(config)
  tx, _, disc_tx = tokenizer_step.build_optimizers(config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, config, 1)
  shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"))
  state = ckpt.restore(ckpt.latest_step(), checkpoint.abstract_with_shardings(
      shapes, jax.tree.map(lambda _: device, shapes)))
  ckpt.close()
  params = state.ema_params if state.ema_params is not None else state.params
  del state
else:
  params = runs.load_tokenizer(workdir, with_decoder=(mode != "without decoder")).params
jax.block_until_ready(params)
seconds = time.perf_counter() - start
after = status("VmHWM")
count = sum(x.size for x in jax.tree.leaves(params))
print(f"| {mode} | {count / 1e6:.1f}M | {seconds:.2f} | {before:,.0f} -> {after:,.0f} | "
      f"{status('VmRSS'):,.0f} |")
"""


def write_initial_run(config_path: str, workdir: str):
  config = load_config_file(config_path)
  config.loss.perceptual = 0.0  # LPIPS holds no state; skip its weights file
  models = tokenizer_step.build_models(config)
  tx, _, disc_tx = tokenizer_step.build_optimizers(config)
  state = nn.meta.unbox(
      jax.jit(tokenizer_step.make_init_fn(models, tx, disc_tx, config, 1))(jax.random.key(0))
  )
  fileio.write_text(fileio.join(workdir, "config.json"), config.to_json_best_effort())
  ckpt = checkpoint.Checkpointer(fileio.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(0, state, force=True)
  ckpt.close()
  sizes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
  print(f"wrote {config_path} at init to {workdir}: {sizes / 2**30:.2f} GiB of train state")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "vitvq_base.py"))
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir
    if not workdir:
      workdir = os.path.join(tmp, "run")
      write_initial_run(args.config, workdir)
    print("| loader | params | seconds | peak RSS before -> after (MiB) | RSS after (MiB) |")
    print("|---|---|---|---|---|")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    for mode in ("full state", "runs.load_tokenizer", "without decoder"):
      out = subprocess.run(
          [sys.executable, "-c", LOADER, workdir, mode],
          cwd=ROOT,
          env=env,
          capture_output=True,
          text=True,
      )
      line = [l for l in out.stdout.splitlines() if l.startswith("| ")]
      print(line[0] if line else f"| {mode} | failed: {out.stderr[-500:]} |")


if __name__ == "__main__":
  main()
