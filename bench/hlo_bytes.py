"""HBM bytes moved by a compiled executable, read from its optimised HLO text.

On an accelerator the ops softjax ships are memory-bound, so the bytes their kernels read
and write are their time, and unlike a timing the count is exact and noise-free. The count:

* every kernel launch (a fusion, custom call — a Pallas kernel among them —, dot, copy,
  reduce, ...) of the entry computation moves its operands and its result;
* a ``while`` loop's body counts ``known_trip_count`` times; where XLA does not record it
  (the TPU compiler), the bound of a ``fori_loop``'s condition ``i < K`` (one integer
  constant compared with the counter, which starts at 0 and steps by 1); otherwise once. A
  ``conditional`` counts its largest branch;
* a fusion that only dynamic-slices an operand reads the slice, not the operand, and one
  whose root dynamic-update-slices an operand in place moves the update, not the buffer (the
  two ways a loop walks a large array chunk by chunk).

What it does not see: a kernel that reads a block of an operand several times (the tiles of
a matmul, re-read once per tile of the other side) is counted once, for every executable
alike, so compare executables of the same maths, not a matmul with a reduction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

_DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
    "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e5m2fnuz": 8,
    "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BITS) + r")\[([\d,]*)\]")
# Instructions that move no bytes of their own.
_FREE = {
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
}  # fmt: skip
_SLICES = {"dynamic-slice", "slice"}


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple sums its elements)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d)
        total += (n * _DTYPE_BITS[dtype] + 7) // 8
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text between the parentheses
    attrs: str
    root: bool


def _split_shape(rest: str) -> tuple[str, str]:
    """``"(f32[2], s32[]) while(...)"`` -> ``("(f32[2], s32[])", "while(...)")``."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, c in enumerate(rest):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return rest[: i + 1], rest[i + 2 :]
    return rest, ""


def _parse_instruction(line: str) -> Instruction | None:
    m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+) = (.*)$", line)
    if not m:
        return None
    shape, tail = _split_shape(m.group(3))
    op = re.match(r"([\w\-]+)\((.*)$", tail)
    if not op:
        return None
    opcode, body = op.groups()
    depth, end = 1, len(body)
    for i, c in enumerate(body):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            end = i
            break
    operands = re.findall(r"%([\w.\-]+)", body[:end])
    return Instruction(
        m.group(2), shape, opcode, operands, body[:end], body[end + 1 :], bool(m.group(1))
    )


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations of an HLO module by name, and the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        head = re.match(r"(ENTRY\s+)?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = computations.setdefault(head.group(2), [])
            if head.group(1):
                entry = head.group(2)
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            inst = _parse_instruction(line)
            if inst is not None:
                current.append(inst)
    return computations, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=(\{[^}]*\}|%?[\w.\-]+)", attrs)
    if not m:
        return []
    return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",")]


def _fusion_bytes(inst, shapes, fused) -> int:
    """Operand and result bytes of a fusion, seeing through slices and in-place updates."""
    by_name = {i.name: i for i in fused}
    params = {i.name: int(i.args) for i in fused if i.opcode == "parameter"}
    users: dict[str, list[Instruction]] = {}
    for i in fused:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = next((i for i in fused if i.root), fused[-1])
    roots = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    in_place = {
        r.operands[0]: shape_bytes(by_name[r.operands[1]].shape)
        for r in roots
        if r.opcode == "dynamic-update-slice" and r.operands[0] in params
    }
    total = 0
    for pname, index in params.items():
        if index >= len(inst.operands):
            continue
        full = shapes.get(inst.operands[index], "")
        uses = users.get(pname, [])
        if pname in in_place:
            total += in_place[pname]
        elif uses and all(u.opcode in _SLICES and u.operands[0] == pname for u in uses):
            total += sum(shape_bytes(u.shape) for u in uses)
        else:
            total += shape_bytes(full)
    for r in roots:
        if r.opcode == "dynamic-update-slice" and r.operands[0] in in_place:
            total += in_place[r.operands[0]]
        else:
            total += shape_bytes(r.shape)
    return total


def trip_count(inst: Instruction, cond: list[Instruction], computations: dict) -> int:
    """Trips of a ``while`` loop: XLA's ``known_trip_count``, else the ``K`` of a condition
    ``i < K`` (its root compares a counter with one integer constant, possibly inside a
    fusion), else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if known:
        return int(known.group(1))
    root = next((i for i in cond if i.root), None)
    if root is not None and root.opcode == "fusion":
        fused = computations[_called(root.attrs, "calls")[0]]
        compare = next((i for i in fused if i.root), None)
        if compare is None or compare.opcode != "compare":
            return 1
        root = dataclasses.replace(root, opcode="compare", attrs=compare.attrs)
    consts = {
        i.name: i.args
        for i in cond
        if i.opcode == "constant" and re.match(r"[su](32|64)\[\]", i.shape)
    }
    if root is not None and root.opcode == "compare" and "direction=LT" in root.attrs:
        bounds = [consts[o] for o in root.operands if o in consts]
        if len(bounds) == 1 and bounds[0].lstrip("-").isdigit():
            return max(int(bounds[0]), 1)
    return 1


def computation_bytes(name: str, computations: dict) -> int:
    """Bytes moved by one run of computation ``name``."""
    body = computations[name]
    shapes = {i.name: i.shape for i in body}
    total = 0
    for inst in body:
        if inst.opcode in _FREE:
            continue
        if inst.opcode == "while":
            (loop,) = _called(inst.attrs, "body")
            (cond,) = _called(inst.attrs, "condition")
            n = trip_count(inst, computations[cond], computations)
            total += n * computation_bytes(loop, computations)
            total += (n + 1) * computation_bytes(cond, computations)
        elif inst.opcode == "conditional":
            branches = _called(inst.attrs, "branch_computations") or (
                _called(inst.attrs, "true_computation") + _called(inst.attrs, "false_computation")
            )
            total += max((computation_bytes(b, computations) for b in branches), default=0)
        elif inst.opcode == "call":
            called = _called(inst.attrs, "to_apply")
            total += sum(computation_bytes(c, computations) for c in called)
        elif inst.opcode == "fusion":
            (fused,) = _called(inst.attrs, "calls")
            total += _fusion_bytes(inst, shapes, computations[fused])
        elif inst.opcode in _SLICES:
            total += 2 * shape_bytes(inst.shape)
        elif inst.opcode == "dynamic-update-slice":
            total += 2 * shape_bytes(shapes.get(inst.operands[1], ""))
        else:
            total += shape_bytes(inst.shape)
            total += sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
    return total


def hbm_bytes(hlo_text: str) -> int:
    """Bytes read and written by the kernels of a compiled module (``compiled.as_text()``)."""
    computations, entry = parse(hlo_text)
    return computation_bytes(entry, computations)


if __name__ == "__main__":
    import sys

    print(json.dumps({"hbm_bytes": hbm_bytes(open(sys.argv[1]).read())}))
