"""Per-chip memory headroom of a paper config's train step on a TPU slice, with the bytes its
collectives move per step.

  python benchmarks/headroom.py --config=configs/vim_large.py --topology=v4-128 \
      [--tokenizer_config=configs/vitvq_base.py] [--set=grad_accum_steps=2 ...] \
      [--hlo_out=/tmp/x.hlo.txt] [--json_out=/tmp/x.json]

Compiles like vim_jax.compile_report (libtpu, compile-only devices) and prints: per-chip
arguments / temporaries / total and the share of HBM left, TFLOP per chip per step (infra/flops.py),
and each collective kind with how many times it runs per step (ops inside a while loop counted
once per iteration; the trip count is read from the loop condition's `i < N` constant, since
the compiled TPU HLO carries no known_trip_count) and the bytes each chip sends per step:
  all-gather:      result bytes x (n - 1) / n     (n = replica-group size)
  reduce-scatter:  result bytes x (n - 1)
  all-reduce:      2 x bytes x (n - 1) / n        (a ring: reduce-scatter + all-gather)
  all-to-all:      bytes x (n - 1) / n
  collective-permute: bytes
Experiments that need no change to vim_jax/ (each patches the imported module in this process):
  --set=model.remat_policy=minimal_no_qkv | minimal_no_fc1 | minimal_no_qkv_fc1  (stage 2):
      'minimal' minus one group of saved matmuls (told apart by the weight's shape);
  --flat_qkv: q/k/v projections computed as [D, H*K] matmuls (the saved output is H*K lanes
      wide instead of head_dim = 64, which TPU pads to 128);
For the buffer assignment, run it with XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'
(libtpu honours it for the TPU program) and read DIR with benchmarks/buffer_report.py.
Numbers: benchmarks/RESULTS.md, "Headroom on a v4-128".
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vim_jax import main as vim_main  # noqa: E402
from vim_jax.infra import log_filters, tpu_slices  # noqa: E402

DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 0.5,
    "u4": 0.5,
}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(-start)?\("
)
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")


def shape_bytes(text: str) -> list[float]:
  out = []
  for dtype, dims in SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * DTYPE_BYTES[dtype])
  return out


def group_size(line: str, default: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:  # replica_groups=mesh['axis_0'=64,'axis_1'=1] {'axis_0'}: the listed axes' product
    sizes = dict(
        (a.strip().strip("'"), int(n)) for a, n in (x.split("=") for x in m.group(1).split(","))
    )
    n = 1
    for axis in m.group(2).split(","):
      n *= sizes.get(axis.strip().strip("'"), 1)
    return n
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"source_target_pairs=", line)
  return default


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """name -> its lines; and the ENTRY computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    if current is None:
      m = COMPUTATION.match(line.strip())
      if m and line.rstrip().endswith("{"):
        current = m.group(1)
        comps[current] = []
        if line.lstrip().startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)
  return comps, entry


def multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of ENTRY (while bodies x trip count)."""
  edges = collections.defaultdict(list)
  for name, lines in comps.items():
    for line in lines:
      trip = 1
      if " while(" in line:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trip = int(m.group(1)) if m else 1
        c = re.search(r"condition=%?([\w.\-]+)", line)
        if not m and c and c.group(1) in comps:  # i < N with i from 0: N from the condition
          consts = [
              int(x)
              for l in comps[c.group(1)]
              for x in re.findall(r"s32\[\][^ ]* constant\((\d+)\)", l)
          ]
          trip = max(consts) if consts else 1
        for key in ("body", "condition"):
          m = re.search(key + r"=%?([\w.\-]+)", line)
          if m:
            edges[name].append((m.group(1), trip))
        continue
      for m in re.finditer(
          r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", line
      ):
        edges[name].append((m.group(1), 1))
      m = re.search(r"branch_computations=\{([^}]*)\}", line)
      if m:
        for callee in m.group(1).split(","):
          edges[name].append((callee.strip().lstrip("%"), 1))
  mult = collections.Counter()

  def visit(name, times, depth=0):
    if depth > 50:
      return
    mult[name] += times
    for callee, trip in edges.get(name, ()):
      if callee in comps:
        visit(callee, times * trip, depth + 1)

  visit(entry, 1)
  return mult


def collective_traffic(hlo: str, devices: int) -> dict:
  """{kind: {'ops': static count, 'runs': per step, 'result_bytes': per step, 'sent_bytes':
  per step per chip}} and the largest single ones."""
  comps, entry = computations(hlo)
  mult = multiplicities(comps, entry)
  totals = collections.defaultdict(lambda: collections.Counter())
  biggest = []
  for name, lines in comps.items():
    times = mult.get(name, 0)
    for line in lines:
      m = COLLECTIVE.search(line)
      if not m:
        continue
      result, kind, start = m.group(1), m.group(2), m.group(3)
      sizes = shape_bytes(result)
      if start and kind == "all-gather":  # ((operands), (results))
        sizes = sizes[len(sizes) // 2 :]
      elif start and kind == "collective-permute":
        sizes = sizes[1:2] if len(sizes) >= 2 else sizes
      nbytes = sum(sizes)
      n = group_size(line, devices)
      if kind == "all-gather":
        sent = nbytes * (n - 1) / n
      elif kind == "reduce-scatter":
        sent = nbytes * (n - 1)
      elif kind == "all-reduce":
        sent = 2 * nbytes * (n - 1) / n
      elif kind == "all-to-all":
        sent = nbytes * (n - 1) / n
      else:
        sent = nbytes
      t = totals[kind]
      t["ops"] += 1
      t["runs"] += times
      t["result_bytes"] += nbytes * times
      t["sent_bytes"] += sent * times
      biggest.append((sent * times, kind, times, n, result.strip()[:160], name))
  biggest.sort(reverse=True)
  return {"by_kind": {k: dict(v) for k, v in totals.items()}, "largest": biggest[:12]}


def custom_policies(width: int, mlp_dim: int) -> dict:
  """Remat policies between 'minimal' and 'full', told apart by the weight's shape (no model
  change needed): 'minimal' saves every matmul without batch dimensions (q, k, v, the
  attention output projection, fc1, fc2); these save all of them but one group."""
  from jax import lax  # lazy: jax only after prepare_environment (see main)

  def minimal_except(skip):
    def policy(prim, *avals, **params):
      if prim is not lax.dot_general_p:
        return False
      (_, _), (lhs_batch, _) = params["dimension_numbers"]
      if lhs_batch:
        return False
      return not skip(avals[0].shape, avals[1].shape)

    return policy

  is_qkv = lambda lhs, rhs: len(lhs) == 3 and len(rhs) == 3 and rhs[0] == width
  is_fc1 = lambda lhs, rhs: len(rhs) == 2 and rhs == (width, mlp_dim)
  return {
      "minimal_no_qkv": minimal_except(is_qkv),
      "minimal_no_fc1": minimal_except(is_fc1),
      "minimal_no_qkv_fc1": minimal_except(lambda l, r: is_qkv(l, r) or is_fc1(l, r)),
  }


class _FlatQKV:
  """jnp for vim_jax.models.transformer with the q/k/v projection 'bld,dhk->blhk' computed as
  [B, L, D] x [D, H*K] -> [B, L, H*K] reshaped to [B, L, H, K] (the same math): the matmul
  'minimal' saves is then [.., H*K] wide, not [.., K] = 64 (padded to 128 lanes on TPU)."""

  def __init__(self, jnp):
    self._jnp = jnp

  def __getattr__(self, name):
    return getattr(self._jnp, name)

  def einsum(self, spec, *operands, **kwargs):
    if spec == "bld,dhk->blhk":
      x, kernel = operands
      d, h, k = kernel.shape
      y = self._jnp.einsum("bld,dn->bln", x, kernel.reshape(d, h * k), **kwargs)
      return y.reshape(*y.shape[:2], h, k)
    return self._jnp.einsum(spec, *operands, **kwargs)


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--config", required=True)
  parser.add_argument("--tokenizer_config", default="")
  parser.add_argument("--topology", default="v4-128")
  parser.add_argument(
      "--set", action="append", default=[], help="dotted.key=value config override (repeatable)"
  )
  parser.add_argument("--hlo_out", default="", help="write the compiled HLO text here")
  parser.add_argument("--json_out", default="")
  parser.add_argument(
      "--flat_qkv",
      action="store_true",
      help="q/k/v projections as one "
      "[D, H*K] matmul each (see _FlatQKV); an experiment, not the model's code",
  )
  parser.add_argument(
      "--analyze_hlo",
      default="",
      help="only print the collectives of this compiled HLO text file (no compile)",
  )
  args = parser.parse_args()
  if args.analyze_hlo:
    spec = tpu_slices.parse(args.topology)
    print_traffic(collective_traffic(open(args.analyze_hlo).read(), spec.chips))
    return

  log_filters.install()
  spec = tpu_slices.parse(args.topology)
  tpu_slices.prepare_environment()
  import jax  # lazy: reads JAX_PLATFORMS on import, which prepare_environment sets

  from vim_jax.trainers import step_report  # lazy: may load jax (as above)

  jax.config.update("jax_enable_compilation_cache", False)
  devices = tpu_slices.compile_only_devices(spec)
  config = vim_main.load_config_file(
      os.path.join(ROOT, args.config) if not os.path.isabs(args.config) else args.config
  )
  for item in args.set:
    key, value = item.split("=", 1)
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(parse_value(value)) if not isinstance(node[leaf], str) else value
  if config.trainer == "vim":
    from vim_jax.models import transformer  # lazy: loads jax (see above)

    transformer.REMAT_POLICIES.update(custom_policies(config.model.width, config.model.mlp_dim))
    if args.flat_qkv:
      transformer.jnp = _FlatQKV(transformer.jnp)
  tokenizer = (
      vim_main.load_config_file(os.path.join(ROOT, args.tokenizer_config))
      if args.tokenizer_config
      else None
  )
  start = time.perf_counter()
  numbers = step_report.report(config, devices, tokenizer_config=tokenizer)
  wall = time.perf_counter() - start
  hlo = numbers["compiled"].as_text()
  m = numbers["compiled"].memory_analysis()
  print("  memory_analysis:", {k: getattr(m, k) for k in dir(m) if not k.startswith("_")})
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(hlo)
  traffic = collective_traffic(hlo, spec.chips)
  hbm = spec.generation.hbm_bytes
  gib = lambda b: b / 2**30
  out = {
      "config": args.config,
      "overrides": args.set,
      "flat_qkv": args.flat_qkv,
      "topology": args.topology,
      "batch_size": config.batch_size,
      "mesh": numbers["mesh"],
      "argument_gib": gib(numbers["argument_bytes"]),
      "output_gib": gib(numbers["output_bytes"]),
      "temp_gib": gib(numbers["temp_bytes"]),
      "alias_gib": gib(numbers["alias_bytes"]),
      "total_gib": gib(numbers["total_bytes"]),
      "hbm_free": 1 - numbers["total_bytes"] / hbm,
      "tflop_per_chip": numbers["flops_per_device"] / 1e12,
      "xla_tflop_per_chip": numbers.get("xla_flops_per_device", float("nan")) / 1e12,
      "compile_seconds": numbers["compile_seconds"],
      "wall_seconds": wall,
      "collectives_static": numbers["collectives"],
      "collectives": traffic["by_kind"],
  }
  print(
      f"{args.config} {' '.join(args.set)} on {args.topology}: batch {config.batch_size}, "
      f"mesh {numbers['mesh']}"
  )
  print(
      f"  per chip: arguments {out['argument_gib']:.2f} / temporaries {out['temp_gib']:.2f} / "
      f"outputs {out['output_gib']:.2f} / aliased {out['alias_gib']:.2f} / total "
      f"{out['total_gib']:.2f} GiB ({100 * (1 - out['hbm_free']):.0f}% of "
      f"{gib(hbm):.0f} GiB; {100 * out['hbm_free']:.0f}% free)"
  )
  print(
      f"  TFLOP per chip per step: {out['tflop_per_chip']:.2f} (XLA cost analysis "
      f"{out['xla_tflop_per_chip']:.2f}); compiled in {out['compile_seconds']:.0f} s"
  )
  print_traffic(traffic)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(out, f, indent=1, default=str)


def print_traffic(traffic):
  for kind, t in sorted(traffic["by_kind"].items()):
    print(
        f"  {kind}: {t['ops']} ops in the HLO, {t['runs']} runs per step, results "
        f"{t['result_bytes'] / 1e9:.2f} GB, sent per chip {t['sent_bytes'] / 1e9:.2f} GB"
    )
  print("  largest collectives (sent GB per step, kind, runs, group, result, computation):")
  for sent, kind, times, n, result, name in traffic["largest"]:
    print(f"    {sent / 1e9:8.3f} {kind} x{times} n={n} {result} [{name}]")


if __name__ == "__main__":
  main()
