"""What a compiled XLA program does to one buffer, read from its HLO text
(`jax.jit(f).lower(...).compile().as_text()`).

Used to check that KV-cached decoding writes one position of the cache per token instead of
copying it (tests/test_vim.py, `compile_report --program=sample`), and to size the decode
loop's state as a TPU lays it out (the step's memory floor).
"""

from __future__ import annotations

import math
import re

# A computation's header: "[ENTRY ]%name (params...) -> result {"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
# An instruction: "  [ROOT ]%name = f32[2,3]{1,0} opcode(operands), attrs"
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\(")
_WHILE_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_FUSION_CALLS = re.compile(r"calls=%([\w.\-]+)")
# Opcodes that name or alias a buffer without writing it.
_NOT_WRITES = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional"}
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
# An array in compiled HLO text: f32[2,3]{1,0:T(8,128)}: dtype, dims, minor-to-major, tiles.
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([\d,]*)(?::([^}]*))?\})?")


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  return computations


def buffer_writes_in_loops(hlo_text: str, shape: tuple[int, ...]) -> dict[str, int]:
  """How the bodies of a compiled program's while loops (nested ones too) produce buffers of
  `shape`, or stacks of them (any shape ending in it), per iteration:

    'updates': dynamic-update-slices, bare or as a fusion's result (in place: they write the
               slice);
    'full':    anything else that makes one (a copy, a zero-fill, a transpose, a slice out of a
               stack, a fusion whose result is a whole new buffer).

  Ops inside a fusion are not buffers and are not counted (on TPU the attention reads the
  cache through a fused convert and multiply). For a KV-cached decode loop, updates == 2 x
  layers (one position of K and of V) and full == 0 mean the cache is never copied."""
  computations = _computations(hlo_text)
  root_opcode = {}
  for name, lines in computations.items():
    root = next((_INSTRUCTION.match(l) for l in lines if l.lstrip().startswith("ROOT ")), None)
    root_opcode[name] = root.group(2) if root else ""
  counts = {"updates": 0, "full": 0}
  for body in set(_WHILE_BODY.findall(hlo_text)):
    for line in computations.get(body, []):
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      dims = _dims(m.group(1))
      if len(dims) < len(shape) or dims[len(dims) - len(shape) :] != tuple(shape):
        continue
      opcode = m.group(2)
      if opcode == "fusion":
        opcode = root_opcode.get(_FUSION_CALLS.search(line).group(1), opcode)
      if opcode == "dynamic-update-slice":
        counts["updates"] += 1
      elif opcode not in _NOT_WRITES:
        counts["full"] += 1
  return counts


def array_bytes(
    dtype: str,
    dims: tuple[int, ...],
    minor_to_major: tuple[int, ...] = (),
    tile: tuple[int, ...] = (),
) -> int:
  """Bytes of an array as laid out: the dims a tile covers (the minor-most, in layout order)
  padded to the tile's multiples, as a TPU stores them (T(8,128): a head_dim of 64 in the
  minor-most place takes 128 lanes)."""
  padded = list(dims)
  order = list(minor_to_major) or list(range(len(dims)))[::-1]
  for t, d in zip(reversed(tile), order):  # the tile's last entry covers the minor-most dim
    padded[d] = -(-padded[d] // t) * t
  return math.prod(padded) * _ITEMSIZE.get(dtype, 4)


def largest_loop_state(hlo_text: str, shape: tuple[int, ...]) -> dict[str, int]:
  """What the largest while loop of a compiled program carries, in bytes as laid out:
  'bytes', everything (for the sampler's decode loop: the params as the loop reads them, e.g.
  a bf16 copy XLA made before the loop, the KV cache, the tokens), and 'cache_bytes', its
  arrays of `shape` (one chip's K or V of one layer). Each decode step reads all of it once at
  least: the step's floor."""
  best = {"bytes": 0, "cache_bytes": 0}
  for line in hlo_text.splitlines():
    if " while(" not in line or " = (" not in line:
      continue
    state = line.split(" = ", 1)[1].split(" while(", 1)[0]
    total = cache = 0
    for dtype, dims, layout, tiles in _ARRAY.findall(state):
      dims = _dims(dims)
      tile = re.match(r"T\(([\d,]+)\)", tiles or "")
      size = array_bytes(dtype, dims, _dims(layout), _dims(tile.group(1)) if tile else ())
      total += size
      cache += size if dims == tuple(shape) else 0
    if total > best["bytes"]:
      best = {"bytes": total, "cache_bytes": cache}
  return best
