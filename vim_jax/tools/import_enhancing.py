"""Imports a published thuanz123/enhancing-transformers ViT-VQGAN into a stage-1 workdir.

  pip install '.[convert]'      # torch, only for reading the checkpoint
  python -m vim_jax.tools.import_enhancing --ckpt=imagenet_vitvq_base.ckpt \
      --config=configs/enhancing_vitvq_base.py --workdir=workdirs/enhancing_base

--ckpt: their PyTorch Lightning checkpoint (a dict whose 'state_dict' holds the model, and
'global_step'), or a bare state_dict. The tokenizer's keys are read (encoder.*, decoder.*,
quantizer.*, pre_quant.*, post_quant.*); the loss networks' (loss.*: LPIPS, the discriminator)
are ignored. The workdir gets config.json and an orbax checkpoint at the checkpoint's step (0
for a bare state_dict), which `python -m vim_jax.evaluate`, a VIM config's tokenizer_workdir,
`vim_jax.tools.pretokenize`, `vim_jax.sample` and the notebook all accept.

What the import checks, refusing with a message that names the key:
  - every tokenizer key the config's model needs is there, and no other;
  - every shape, with the model size named when the checkpoint is another one (Small weights
    given the Base config);
  - their stored sin-cos position tables equal the ones our model computes.

The layouts map one to one (PyTorch Linear weights are [out, in]; ours [in, out]):
  encoder.to_patch_embedding.0 (Conv2d, kernel = stride = p)  encoder/patch_embedding, a Dense
      on patches flattened in (row, column, channel) order
  {encoder,decoder}.transformer.layers.L.0.norm / .1.norm   .../block_L/ln_attention, ln_mlp
  ...layers.L.0.fn.to_qkv (one bias-free [3 x heads x 64, D]) .../attention/{query,key,value}_kernel
  ...layers.L.0.fn.to_out                                    .../attention/out_kernel, out_bias
  ...layers.L.1.fn.net.0 / net.2                             .../mlp/fc1, fc2
  {encoder,decoder}.transformer.norm (older files: .norm)    .../transformer/ln_final
  pre_quant / post_quant                                     encoder/to_code, decoder/from_code
  quantizer.embedding.weight                                 quantizer/codebook (normalised at
                                                             use in both)
  decoder.to_pixel.1 (ConvTranspose2d, kernel = stride = p;  decoder/to_pixels, a Dense per token
      older files: to_pixel.conv_out)                        to p x p x 3 (its bias repeated)
With scanned layers (the config's scan_layers) the blocks are stacked under layers/block.
"""

from __future__ import annotations

import argparse
import io
import logging
import re

import jax
import ml_collections
import numpy as np

from vim_jax.infra import fileio, log_filters, runs
from vim_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

TOKENIZER_PREFIXES = ("encoder.", "decoder.", "quantizer.", "pre_quant.", "post_quant.")
# Names that changed across their repository's history: (the current one, the older one).
RENAMED = (
    ("decoder.to_pixel.1.", "decoder.to_pixel.conv_out."),
    ("encoder.transformer.norm.", "encoder.norm."),
    ("decoder.transformer.norm.", "decoder.norm."),
)


class CheckpointMismatch(ValueError):
  """A checkpoint that does not describe the config's model (the message says how)."""


def read_checkpoint(path: str, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], int]:
  """(the tokenizer's arrays by their key, the training step) of a Lightning checkpoint or a
  bare state_dict. Loads with torch's weights_only unpickler unless trust_pickle."""
  try:
    import torch  # lazy: optional (the convert extra), and slow to import
  except ImportError as e:
    raise SystemExit("reading PyTorch checkpoints needs torch: pip install '.[convert]'") from e
  if not fileio.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path!r}")
  try:
    loaded = torch.load(
        io.BytesIO(fileio.read_bytes(path)), map_location="cpu", weights_only=not trust_pickle
    )
  except Exception as e:  # the weights_only unpickler names the class it refused
    if trust_pickle:
      raise
    raise CheckpointMismatch(
        f"torch could not read {path!r} with weights_only=True ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:300]}). If you trust the file, rerun with --trust_pickle "
        "(unpickling can run code)."
    ) from e
  state, step = loaded, 0
  if isinstance(loaded, dict) and "state_dict" in loaded:
    state, step = loaded["state_dict"], int(loaded.get("global_step", 0) or 0)
  if not isinstance(state, dict):
    raise CheckpointMismatch(
        f"{path!r} holds a {type(state).__name__}; expected a Lightning "
        "checkpoint (a dict with 'state_dict') or a state_dict."
    )
  tokenizer = {
      k: v.detach().float().numpy() for k, v in state.items() if k.startswith(TOKENIZER_PREFIXES)
  }
  ignored = sorted({k.split(".")[0] for k in state if not k.startswith(TOKENIZER_PREFIXES)})
  if ignored:
    log.info("ignoring the checkpoint's %s.* (not the tokenizer)", ".*, ".join(ignored))
  for current, older in RENAMED:  # read older files under today's names
    for key in [k for k in tokenizer if k.startswith(older)]:
      tokenizer[current + key[len(older) :]] = tokenizer.pop(key)
  return tokenizer, step


def _check_size(state: dict[str, np.ndarray], config: ml_collections.ConfigDict):
  """Refuses a checkpoint of another model size before any key-by-key complaint."""
  m = config.model
  patch = state.get("encoder.to_patch_embedding.0.weight")
  if patch is None:
    return  # reported as a missing key
  depth = 1 + max(
      (int(k.split(".")[3]) for k in state if re.match(r"encoder\.transformer\.layers\.\d+\.", k)),
      default=-1,
  )
  got = (patch.shape[0], depth, patch.shape[-1])
  want = (m.encoder.width, m.encoder.num_layers, m.patch_size)
  if got != want:
    raise CheckpointMismatch(
        f"the checkpoint is a ViT-VQGAN of width {got[0]}, {got[1]} encoder blocks and patch "
        f"{got[2]}; the config describes width {want[0]}, {want[1]} blocks and patch {want[2]}. "
        "Use the config of the checkpoint's size (configs/enhancing_vitvq_small.py: width "
        "512, 8 blocks; configs/enhancing_vitvq_base.py: width 768, 12 blocks)."
    )


class _Reader:
  """Takes arrays out of the state dict by key, checking shapes; reports what is left."""

  def __init__(self, state: dict[str, np.ndarray]):
    self.state = dict(state)
    self.missing: list[str] = []

  def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.state:
      self.missing.append(key)
      return np.zeros(shape, np.float32)
    value = self.state.pop(key)
    if value.shape != tuple(shape):
      raise CheckpointMismatch(
          f"{key} has shape {tuple(value.shape)}; the config's model needs {tuple(shape)}."
      )
    return value.astype(np.float32)


def _stack_params(r: _Reader, prefix: str, stack) -> dict:
  """A Transformer stack's params in our unrolled layout (block_00, ...)."""
  d, h, k, mlp = stack.width, stack.num_heads, stack.head_dim, stack.mlp_dim
  inner = h * k
  out = {}
  for i in range(stack.num_layers):
    p = f"{prefix}.transformer.layers.{i}"
    qkv = r.take(f"{p}.0.fn.to_qkv.weight", (3 * inner, d))  # rows [q | k | v], heads outer
    to_kernel = lambda rows: np.ascontiguousarray(rows.T.reshape(d, h, k))
    out[f"block_{i:02d}"] = {
        "ln_attention": {
            "scale": r.take(f"{p}.0.norm.weight", (d,)),
            "bias": r.take(f"{p}.0.norm.bias", (d,)),
        },
        "attention": {
            "query_kernel": to_kernel(qkv[:inner]),
            "key_kernel": to_kernel(qkv[inner : 2 * inner]),
            "value_kernel": to_kernel(qkv[2 * inner :]),
            "out_kernel": np.ascontiguousarray(
                r.take(f"{p}.0.fn.to_out.weight", (d, inner)).T.reshape(h, k, d)
            ),
            "out_bias": r.take(f"{p}.0.fn.to_out.bias", (d,)),
        },
        "ln_mlp": {
            "scale": r.take(f"{p}.1.norm.weight", (d,)),
            "bias": r.take(f"{p}.1.norm.bias", (d,)),
        },
        "mlp": {
            "fc1": {
                "kernel": r.take(f"{p}.1.fn.net.0.weight", (mlp, d)).T.copy(),
                "bias": r.take(f"{p}.1.fn.net.0.bias", (mlp,)),
            },
            "fc2": {
                "kernel": r.take(f"{p}.1.fn.net.2.weight", (d, mlp)).T.copy(),
                "bias": r.take(f"{p}.1.fn.net.2.bias", (d,)),
            },
        },
    }
  out["ln_final"] = {
      "scale": r.take(f"{prefix}.transformer.norm.weight", (d,)),
      "bias": r.take(f"{prefix}.transformer.norm.bias", (d,)),
  }
  if stack.scan_layers:  # one [num_layers, ...] array per leaf, as nn.scan stores them
    blocks = [out.pop(f"block_{i:02d}") for i in range(stack.num_layers)]
    out["layers"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  return out


def _check_position_table(r: _Reader, key: str, grid, width: int):
  """Their frozen sin-cos table must be the one our model computes (else refuse). Our model
  recomputes it, so a file without it is fine."""
  if key not in r.state:
    return
  stored = r.take(key, (1, grid[0] * grid[1], width))[0]
  ours = tokenizer_lib.sincos_position_embedding(grid, width)
  worst = float(np.abs(stored - ours).max())
  if worst > 1e-5:
    raise CheckpointMismatch(
        f"{key} differs from the 2-D sin-cos table the config's model computes by up to "
        f"{worst:.3g}; the checkpoint is not the model the config describes "
        "(position_embedding='sincos')."
    )


def convert(state: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
  """Our tokenizer params from their tokenizer arrays (numpy, their key layout), for the model
  `config` describes. Raises CheckpointMismatch naming every missing or unexpected key, a wrong
  shape or a checkpoint of another size."""
  m = config.model
  expected = dict(
      position_embedding="sincos",
      output_ffn=False,
      pixel_range="zero_to_one",
      logit_laplace=False,
      l2_normalize=True,
  )
  wrong = {k: m.get(k) for k, v in expected.items() if m.get(k) != v}
  for name, stack in (("encoder", m.encoder), ("decoder", m.decoder)):
    for k, v in (("mlp_activation", "tanh"), ("qkv_bias", False)):
      if stack.get(k) != v:
        wrong[f"{name}.{k}"] = stack.get(k)
  if wrong:
    raise CheckpointMismatch(
        f"the config does not describe an enhancing-transformers ViT-VQGAN (model fields "
        f"{wrong}); use configs/enhancing_vitvq_small.py or configs/enhancing_vitvq_base.py."
    )
  _check_size(state, config)
  r = _Reader(state)
  p, c = m.patch_size, m.code_dim
  grid = (config.image_size // p,) * 2
  enc, dec = m.encoder, m.decoder
  # Conv2d [D, 3, p, p] -> a Dense on patches flattened as (row, column, channel): [p*p*3, D].
  patch = r.take("encoder.to_patch_embedding.0.weight", (enc.width, 3, p, p))
  pixels = r.take("decoder.to_pixel.1.weight", (dec.width, 3, p, p))  # (in, out, row, column)
  params = {
      "encoder": {
          "patch_embedding": {
              "kernel": patch.transpose(2, 3, 1, 0).reshape(p * p * 3, enc.width),
              "bias": r.take("encoder.to_patch_embedding.0.bias", (enc.width,)),
          },
          "transformer": _stack_params(r, "encoder", enc),
          "to_code": {
              "kernel": r.take("pre_quant.weight", (c, enc.width)).T.copy(),
              "bias": r.take("pre_quant.bias", (c,)),
          },
      },
      "quantizer": {"codebook": r.take("quantizer.embedding.weight", (m.codebook_size, c))},
      "decoder": {
          "from_code": {
              "kernel": r.take("post_quant.weight", (dec.width, c)).T.copy(),
              "bias": r.take("post_quant.bias", (dec.width,)),
          },
          "transformer": _stack_params(r, "decoder", dec),
          # ConvTranspose2d -> a Dense per token to its pixels in (row, column, channel) order.
          "to_pixels": {
              "kernel": pixels.transpose(0, 2, 3, 1).reshape(dec.width, p * p * 3),
              "bias": np.tile(r.take("decoder.to_pixel.1.bias", (3,)), p * p),
          },
      },
  }
  _check_position_table(r, "encoder.en_pos_embedding", grid, enc.width)
  _check_position_table(r, "decoder.de_pos_embedding", grid, dec.width)
  problems = [f"missing {k}" for k in r.missing]
  problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in sorted(r.state.items())]
  if problems:
    raise CheckpointMismatch(
        "the checkpoint's tokenizer keys do not match the config's model:\n  "
        + "\n  ".join(problems[:20])
        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    )
  return params


def import_checkpoint(
    ckpt: str, config: ml_collections.ConfigDict, workdir: str, trust_pickle: bool = False
) -> int:
  """Reads, converts and writes the run; returns the step it was written at."""
  state, step = read_checkpoint(ckpt, trust_pickle)
  params = convert(state, config)
  runs.write_run(workdir, config, params, step)
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ckpt", required=True, help="their Lightning .ckpt or a state_dict")
  parser.add_argument(
      "--config",
      required=True,
      help="configs/enhancing_vitvq_small.py or _base.py (a :variant allowed)",
  )
  parser.add_argument("--workdir", required=True, help="the stage-1 workdir to write")
  parser.add_argument(
      "--trust_pickle",
      action="store_true",
      help="load with torch's full unpickler (only for files you trust)",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  log_filters.install()
  from vim_jax import main as vim_main  # lazy: main defines absl flags (--config, --workdir)

  config = vim_main.load_config_file(args.config)
  try:
    step = import_checkpoint(args.ckpt, config, args.workdir, args.trust_pickle)
  except CheckpointMismatch as e:
    raise SystemExit(f"error: {e}") from None
  print(
      f"imported {args.ckpt} (step {step}) into {args.workdir}: a stage-1 run of "
      f"{args.config}; evaluate it with python -m vim_jax.evaluate --workdir={args.workdir}"
  )


if __name__ == "__main__":
  main()
