"""The largest temporaries of a compiled XLA program, from its buffer assignment dump.

  XLA_FLAGS='--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text' \
      python -m vim_jax.compile_report --config=... --topology=v4-128
  python benchmarks/buffer_report.py /tmp/dump [--module=jit_train_step] [--top=40]

libtpu honours XLA_FLAGS for the TPU program it compiles for compile-only devices: the dump
holds module_NNNN.jit_train_step.*.after_optimizations-buffer-assignment.txt (every value and
its offset in the allocations), ...-memory-usage-report.txt and ...after_optimizations.txt
(the HLO, with each op's source in metadata op_name).

The preallocated temporary allocation is a packing of values over time: values that are never
alive together share an offset range (a "slot"). By default this prints, per slot of the
largest temporary allocation, its size and the largest values placed in it, each with its
shape as laid out (tiles such as T(8,128) pad the two minor dimensions) and the source op
(op_name); slots starting at different offsets can overlap, so their sum can exceed the
allocation.

--peak lists the values live at the peak of ...-live-range.txt instead (that file's byte
counts are unpadded; the sizes printed are the buffer assignment's, each buffer counted once),
with --categories summing them by source (CATEGORIES: arguments, encoder / decoder / VIM
stacks, LPIPS, discriminator, R1).
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re

VALUE = re.compile(
    r"^ value: <(\d+) ([^ >]+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$"
)
DTYPE_BITS = {
    "pred": 8,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "bf16": 16,
    "f16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
}


def find(dump: str, module: str, suffix: str) -> str:
  files = sorted(glob.glob(os.path.join(dump, f"module_*{module}*{suffix}")))
  files = [f for f in files if "cpu_after" not in f]
  if not files:
    raise SystemExit(f"no *{module}*{suffix} under {dump}")
  return max(files, key=os.path.getsize)


def allocations(path: str):
  """[(index, size, header, [values])]: values as (id, name, size, offset, shape)."""
  out, current = [], None
  for line in open(path):
    if line.startswith("allocation "):
      m = re.match(r"allocation (\d+): size (\d+)(.*)$", line)
      current = (int(m.group(1)), int(m.group(2)), m.group(3).strip(), [])
      out.append(current)
    elif current and line.startswith(" value:"):
      m = VALUE.match(line.rstrip())
      if m:
        current[3].append(
            (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5))
        )
  return out


def op_names(hlo_path: str) -> dict[str, str]:
  names = {}
  for line in open(hlo_path):
    m = re.match(r"\s*(?:ROOT )?%([^ ]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def logical_bytes(shape: str) -> int:
  """Bytes of the first array shape in `shape` without layout padding."""
  m = re.search(r"\b(\w+)\[([0-9,]*)\]", shape)
  if not m or m.group(1) not in DTYPE_BITS:
    return 0
  dims = [int(d) for d in m.group(2).split(",") if d]
  return math.prod(dims) * DTYPE_BITS[m.group(1)] // 8


def short(op_name: str) -> str:
  op_name = re.sub(r"^jit\(\w+\)/", "", op_name)
  op_name = op_name.replace("transformer/transformer._scanned/while/body/closed_call/", "")
  return op_name[-150:]


def peak_values(path: str):
  """(logical time, [(value name, bytes)]) of the values live at the peak of the HloLiveRange
  dump (...-live-range.txt)."""
  out, time, on = [], None, False
  for line in open(path):
    m = re.match(r"\s*Live ranges at (\d+) \(peak\):", line)
    if m:
      time, on = int(m.group(1)), True
      continue
    if on:
      m = re.match(r"\s+([^ ]+): (\d+) bytes", line)
      if not m:
        break
      out.append((m.group(1), int(m.group(2))))
  return time, out


CATEGORIES = [  # (name, regex on the source op's op_name), first match wins
    ("arguments (params, optimizer state)", r"^argument|state\.|param"),
    ("R1 (cond)", r"r1|cond"),
    ("discriminator", r"StyleGAN"),
    ("LPIPS", r"LPIPS"),
    ("encoder: fc1 / GELU residuals", r"encode.*mlp"),
    ("encoder: q/k/v, attention", r"encode.*attention"),
    ("encoder: other (LayerNorm, residual stream)", r"encode"),
    ("decoder: fc1 / GELU residuals", r"decode.*mlp"),
    ("decoder: q/k/v, attention", r"decode.*attention"),
    ("decoder: other (LayerNorm, residual stream)", r"decode"),
    ("VIM stack", r"VIM"),
]


INFORMATIVE = re.compile(r"encode|decode|LPIPS|StyleGAN|VIM|r1|cond|lpips|head|transformer")


def describe(name: str, allocs, names: dict) -> tuple[str, str, str]:
  """(shape as laid out, source op, the value whose op_name says most) for a value name."""
  where = None
  name = name[:-2] if name.endswith("{}") else name
  for a in allocs:
    for v in a[3]:
      if v[1] == name:
        where = (a, v)
        break
    if where:
      break
  if where is None:
    return "?", names.get(re.sub(r"\{.*\}$", "", name), "?"), name, None, None
  a, v = where
  if "parameter" in a[2]:
    return v[4], "argument: " + a[2][:60], name, v[2], (a[0], v[3])
  best = (names.get(re.sub(r"\{.*\}$", "", name), "?"), name)
  for u in a[3]:  # values placed in the same bytes: the one whose op_name is informative
    if u[3] == v[3] and u[2] == v[2]:
      op = names.get(re.sub(r"\{.*\}$", "", u[1]), "")
      if INFORMATIVE.search(op) and not INFORMATIVE.search(best[0]):
        best = (op, u[1])
      elif INFORMATIVE.search(op) and "dot_general" in op and "dot_general" not in best[0]:
        best = (op, u[1])
  return v[4], best[0], best[1], v[2], (a[0], v[3])


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("dump")
  parser.add_argument("--module", default="jit_train_step")
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--values_per_slot", type=int, default=3)
  parser.add_argument(
      "--categories",
      action="store_true",
      help="with --peak: sums by the source op's path (CATEGORIES)",
  )
  parser.add_argument(
      "--peak",
      action="store_true",
      help="list the values live at the peak "
      "(from ...-live-range.txt) with their source ops instead of the slots",
  )
  args = parser.parse_args()
  ba = find(args.dump, args.module, "after_optimizations-buffer-assignment.txt")
  hlo = find(args.dump, args.module, "after_optimizations.txt")
  names = op_names(hlo)
  allocs = allocations(ba)
  gib = lambda b: b / 2**30
  params = sum(a[1] for a in allocs if "parameter" in a[2])
  print(f"{os.path.basename(ba)}")
  print(f"allocations: {len(allocs)}; parameters {gib(params):.3f} GiB")
  for a in sorted(allocs, key=lambda a: -a[1])[:4]:
    print(f"  allocation {a[0]}: {gib(a[1]):.3f} GiB {a[2][:60]}")
  if args.peak:
    lr = find(args.dump, args.module, "after_optimizations-live-range.txt")
    time, values = peak_values(lr)
    total = sum(b for _, b in values)
    print(
        f"\nlive at the peak (logical time {time}): {len(values)} values, {gib(total):.3f} GiB "
        "(arguments included)"
    )
    rows, seen = [], set()
    for value, nbytes in values:  # the live-range dump's bytes are unpadded: use the assigned
      shape, op, via, assigned, place = describe(value, allocs, names)
      if place is not None and place in seen:  # another name for a buffer already counted
        continue
      seen.add(place)
      rows.append((value, assigned or nbytes, shape, op, via))
    rows.sort(key=lambda r: -r[1])
    print(
        f"distinct buffers as laid out (buffer-assignment sizes): {len(rows)}, "
        f"{gib(sum(r[1] for r in rows)):.3f} GiB"
    )
    if args.categories:
      sums = collections.Counter()
      for value, nbytes, shape, op, via in rows:
        cat = next((c for c, pattern in CATEGORIES if re.search(pattern, op)), "other")
        sums[cat] += nbytes
      for cat, nbytes in sums.most_common():
        print(f"{gib(nbytes):7.3f}  {cat}")
    for value, nbytes, shape, op, via in rows[: args.top]:
      print(
          f"{gib(nbytes):7.3f}  {value[:28]:28} {shape[:60]:60} <- {short(op)}"
          + (f"  (via {via})" if via != value else "")
      )
    return
  temp = max((a for a in allocs if "preallocated-temp" in a[2]), key=lambda a: a[1])
  slots = collections.defaultdict(list)
  for v in temp[3]:
    slots[v[3]].append(v)
  # A slot: the values starting at one offset; its size is the largest of them.
  rows = sorted(((max(v[2] for v in vs), off, vs) for off, vs in slots.items()), reverse=True)
  print(
      f"\ntemporaries (allocation {temp[0]}, {gib(temp[1]):.3f} GiB): the {args.top} largest "
      "slots (offset ranges shared by values never alive together)"
  )
  print(f"{'GiB':>7} {'offset GiB':>10}  values: shape as laid out [unpadded GiB] <- source op")
  shown = 0
  for size, off, vs in rows[: args.top]:
    shown += size
    vs = sorted(vs, key=lambda v: -v[2])
    seen, lines = set(), []
    for _, name, vsize, _, shape in vs:
      base = re.sub(r"\{\d+\}$", "", name)
      src = short(names.get(base, names.get(name, "?")))
      key = (shape, src)
      if key in seen:
        continue
      seen.add(key)
      pad = logical_bytes(shape)
      lines.append(f"{shape[:70]} [{gib(pad):.3f}] <- {name[:40]}: {src}")
      if len(lines) >= args.values_per_slot:
        break
    print(f"{gib(size):7.3f} {gib(off):10.3f}  " + ("\n" + " " * 20).join(lines))
  print(f"the {args.top} slots: {gib(shown):.3f} GiB of {gib(temp[1]):.3f}")


if __name__ == "__main__":
  main()
