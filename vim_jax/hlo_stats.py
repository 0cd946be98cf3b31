"""What a compiled XLA program does to one buffer, read from its HLO text
(`jax.jit(f).lower(...).compile().as_text()`).

Used to check that KV-cached decoding writes one position of the cache per token instead of
copying it (tests/test_vim.py, the compile report's sampler section).
"""

from __future__ import annotations

import re

# A computation's header: "[ENTRY ]%name (params...) -> result {"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
# An instruction: "  [ROOT ]%name = f32[2,3]{1,0} opcode(operands), attrs"
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\](?:\{[^}]*\})? "
                          r"([\w\-]+)\(")
_CALLEES = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)="
                      r"\{?(%[\w.\-]+(?:, %[\w.\-]+)*)\}?")
_WHILE_BODY = re.compile(r"\bbody=%([\w.\-]+)")

# Opcodes that name or alias a buffer without writing it; a fusion's own writes are counted
# inside its fused computation.
_NOT_WRITES = {"parameter", "get-tuple-element", "tuple", "bitcast", "fusion", "while", "call",
               "conditional", "custom-call"}


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """name -> its lines (instructions)."""
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


def _inside_loops(computations: dict[str, list[str]]) -> set[str]:
  """Names of the computations that run once per iteration of some while loop: the loops'
  bodies and everything they call (fusions, nested loops, reductions)."""
  pending = [m.group(1) for lines in computations.values() for line in lines
             for m in _WHILE_BODY.finditer(line)]
  seen = set()
  while pending:
    name = pending.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]:
      for m in _CALLEES.finditer(line):
        pending.extend(n.strip().lstrip("%") for n in m.group(1).split(","))
  return seen


def buffer_writes_in_loops(hlo_text: str, shape: tuple[int, ...]) -> dict[str, int]:
  """How the loops of a compiled program write arrays of `shape` (or stacks of them: any
  shape ending in it), per iteration of their bodies:

    'updates': dynamic-update-slices into such a buffer (in place: they write the slice);
    'full':    every other instruction that produces one (copies, zero-fills, transposes,
               dynamic-slices out of a stack): each writes the whole buffer.

  For a KV-cached decode loop, updates == 2 x layers (one position of K and of V) and
  full == 0 means the cache is never copied."""
  computations = _computations(hlo_text)
  counts = {"updates": 0, "full": 0}
  for name in _inside_loops(computations):
    for line in computations[name]:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      dims = tuple(int(d) for d in m.group(2).split(",") if d)
      if dims[len(dims) - len(shape):] != tuple(shape) or len(dims) < len(shape):
        continue
      opcode = m.group(3)
      if opcode == "dynamic-update-slice":
        counts["updates"] += 1
      elif opcode not in _NOT_WRITES:
        counts["full"] += 1
  return counts
