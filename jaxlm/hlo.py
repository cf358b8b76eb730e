"""Reading a compiled XLA program's text (`compiled.as_text()`): the bytes its collectives send.

`cost_analysis()` counts each loop's body once and has no collective traffic, so `jaxlm plan`
reads the program itself: its computations, which ones each loop runs and how many times (the
constant its condition compares the counter below), and the collectives in each.
"""

from __future__ import annotations

import math
import re

import numpy as np

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_COLLECTIVE = re.compile(
    r"= (\S+?)\[([0-9,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-done)?\("
)
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}
_CALLEE = re.compile(r"(?:calls|to_apply|body)=%([\w.\-]+)")


def _groups(line: str) -> list[list[int]]:
    """The device groups of a collective's line (replica_groups over named mesh axes, iota or
    listed, or the pairs of a permute)."""
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        n = math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
        return [list(range(n))]  # one group of that many devices (all are alike)
    if m := re.search(r"source_target_pairs=\{(.*?)\}\}", line):
        return [[int(v) for v in p.split(",")] for p in re.findall(r"\{([0-9,]+)", m.group(1))]
    if m := re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line):
        shape = [int(v) for v in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(v) for v in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    if m := re.search(r"replica_groups=\{(.*?)\}\}", line):
        return [[int(v) for v in g.split(",")] for g in re.findall(r"\{([0-9,]+)", m.group(1))]
    return []


def _trip_count(lines: list[str]) -> int:
    """A while condition's trip count: the constant its counter is compared below (1 if none)."""
    constants = [
        int(v) for line in lines for v in re.findall(r"s32\[\]\S* constant\((\d+)\)", line)
    ]
    return max(constants) if constants and any("direction=LT" in x for x in lines) else 1


def collective_bytes(program: str) -> dict[str, float]:
    """{"ici": bytes, "dcn": bytes} one chip sends in collectives per run of `program` (compiled
    HLO text of one slice), loops multiplied out by their trip counts. ICI: the collective ops;
    per op of result size R over n chips, all-gather and all-to-all R (n-1)/n, reduce-scatter
    R (n-1), all-reduce 2 R (n-1)/n, a permute R. DCN: a multi-slice program reaches the other
    slices by host-transfer sends (XLA's megascale runtime), counted at their operand's size."""
    bodies: dict[str, list[str]] = {}
    name = entry = None
    for line in program.splitlines():
        if m := _COMPUTATION.match(line):
            name = m.group(1)
            bodies[name] = []
            entry = name if line.startswith("ENTRY ") else entry
        elif name is not None:
            bodies[name].append(line)
    memo: dict[str, tuple[float, float]] = {}

    def walk(comp: str, depth: int = 0) -> tuple[float, float]:
        if comp in memo or depth > 64:
            return memo.get(comp, (0.0, 0.0))
        ici = dcn = 0.0
        for line in bodies.get(comp, []):
            if m := _COLLECTIVE.search(line):
                dtype, dims, kind = m.groups()
                size = _bytes(dtype, dims)
                groups = _groups(line)
                if "-done(" in line and (start := re.search(r"-done\(%([\w.\-]+)", line)):
                    head = f"%{start.group(1)} = "  # the async start holds the groups
                    groups = next((_groups(x) for x in bodies[comp] if head in x), groups)
                n = max((len(g) for g in groups), default=1)
                ici += {
                    "all-gather": size * (n - 1) / n,
                    "all-to-all": size * (n - 1) / n,
                    "reduce-scatter": size * (n - 1),
                    "all-reduce": 2 * size * (n - 1) / n,
                    "collective-permute": size,
                }[kind]
            elif (
                " send(" in line
                and "_xla_megascale" in line
                and (m := re.search(r"= \((\w+)\[([0-9,]*)\]", line))
            ):
                dcn += _bytes(*m.groups())
            for callee in _CALLEE.findall(line):
                times = 1
                if "body=" in line and (c := re.search(r"condition=%([\w.\-]+)", line)):
                    times = _trip_count(bodies.get(c.group(1), []))
                sub = walk(callee, depth + 1)
                ici, dcn = ici + times * sub[0], dcn + times * sub[1]
        memo[comp] = (ici, dcn)
        return memo[comp]

    ici, dcn = walk(entry) if entry else (0.0, 0.0)
    return {"ici": ici, "dcn": dcn}


def _bytes(dtype: str, dims: str) -> float:
    return math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 1)
