"""Convolution and matmul FLOPs of a compiled XLA program, read from its HLO text.

``compiled.cost_analysis()`` counts elementwise work too and counts a loop
body once; this counts only ``convolution`` and ``dot`` instructions, each
loop body times its trip count, so that it compares with
``torch.utils.flop_counter.FlopCounterMode`` (which counts convolutions and
matrix products, forward and backward, at 2 FLOPs per multiply-add).

Conventions, per instruction (2 FLOPs per multiply-add):

- ``dot``: ``2 * prod(output) * prod(lhs contracting dims)``;
- ``convolution``: ``2 * prod(output) * prod(kernel) / kernel_out_features``
  (each output element sums over the kernel window and its input features;
  feature or batch groups are already in the kernel's shape), divided by the
  product of ``lhs_dilate``: the input gradient of a strided convolution is a
  convolution of the zero-dilated output gradient, whose zeros torch does not
  count (it counts that gradient as the forward's FLOPs) and neither does this.

Computations reached through ``calls=`` (fusions), ``to_apply=`` (calls,
reductions), ``while`` (body times ``known_trip_count``) and conditionals
(the most expensive branch, or the one ``branch`` picks) are followed from
the entry computation.

Use: ``hlo_flops(jax.jit(f).lower(*args).compile().as_text())``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_OPERAND = re.compile(r"(?:[a-z]\w*\[[\d,]*\](?:\{[^}]*\})?\s+)?%([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations=\{([^}]*)\}|true_computation=%([\w.\-]+)"
                       r"|false_computation=%([\w.\-]+))")  # fmt: skip
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Custom calls that would hide a convolution or a matmul from this count.
_GEMM_OR_CONV_TARGET = re.compile(
    r'custom_call_target="([^"]*(?:gemm|matmul|conv)[^"]*)"', re.IGNORECASE
)


@dataclasses.dataclass
class FlopCount:
    """FLOPs of a program, by kind, and what could not be counted.

    Attributes:
      conv: convolution FLOPs.
      dot: dot (matmul) FLOPs.
      unknown_trip_counts: ``while`` instructions without a known trip count
        -> the FLOPs of one iteration (counted once).
      uncounted_custom_calls: custom-call targets that look like a matmul or
        convolution (not counted).
    """

    conv: int = 0
    dot: int = 0
    unknown_trip_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    uncounted_custom_calls: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        """Convolution + dot FLOPs."""
        return self.conv + self.dot


def _shape(type_text: str) -> tuple[int, ...] | None:
    m = _ARRAY.match(type_text.strip())
    if m is None:
        return None  # A tuple or a token.
    return tuple(int(d) for d in m.group(1).split(",") if d)


def _attr(text: str, name: str) -> str | None:
    m = re.search(rf"\b{name}=([^\s,]+)", text)
    return m.group(1) if m else None


def _dims(text: str, name: str) -> list[int]:
    m = re.search(rf"\b{name}=\{{([\d,]*)\}}", text)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _conv_flops(out: tuple[int, ...], rhs: tuple[int, ...], attrs: str) -> int:
    labels = _attr(attrs, "dim_labels")  # e.g. b01f_01io->b01f
    if labels is None:
        raise ValueError(f"convolution without dim_labels: {attrs[:200]}")
    rhs_labels = labels.split("->")[0].split("_")[1]
    window_sum = math.prod(rhs) // rhs[rhs_labels.index("o")]
    flops = 2 * math.prod(out) * window_sum
    window = re.search(r"window=\{([^}]*)\}", attrs)
    dilation = re.search(r"lhs_dilate=([\dx]+)", window.group(1)) if window else None
    if dilation:
        flops //= math.prod(int(d) for d in dilation.group(1).split("x"))
    return flops


def _dot_flops(out: tuple[int, ...], lhs: tuple[int, ...], attrs: str) -> int:
    contracting = _dims(attrs, "lhs_contracting_dims")
    return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _parse(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """Computation name -> instruction lines, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None and line.strip():
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def hlo_flops(hlo_text: str, branch: Callable[[list[int]], int] | None = None) -> FlopCount:
    """Convolution and dot FLOPs of an HLO module (module docstring).

    Args:
      hlo_text: ``compiled.as_text()`` (or any HLO module text).
      branch: given the FLOPs of each branch of a conditional, in branch
        order, the index of the one to count; default: the most expensive.

    Returns:
      A :class:`FlopCount`.
    """
    computations, entry = _parse(hlo_text)
    result = FlopCount()
    memo: dict[str, tuple[int, int]] = {}

    def count(name: str) -> tuple[int, int]:
        if name in memo:
            return memo[name]
        memo[name] = (0, 0)  # Guards against a cycle (none in valid HLO).
        conv = dot = 0
        shapes: dict[str, tuple[int, ...] | None] = {}
        for line in computations.get(name, []):
            m = _INSTRUCTION.match(line)
            if m is None:
                continue
            inst, type_text, opcode, rest = m.groups()
            shapes[inst] = _shape(type_text)
            if opcode in ("convolution", "dot"):
                operands = [shapes.get(o) for o in _OPERAND.findall(rest.split(")", 1)[0])]
                inline = [_shape(t) for t in re.findall(r"[a-z]\w*\[[\d,]*\]", rest.split(")")[0])]
                lhs, rhs = (inline if len(inline) >= 2 else operands)[:2]
                if opcode == "convolution":
                    conv += _conv_flops(shapes[inst], rhs, rest)
                else:
                    dot += _dot_flops(shapes[inst], lhs, rest)
            elif opcode == "custom-call":
                target = _GEMM_OR_CONV_TARGET.search(rest)
                if target:
                    result.uncounted_custom_calls.append(target.group(1))
            branches = [b for g in _BRANCHES.findall(rest) for b in g if b]
            if branches:  # A conditional runs one branch: count the most expensive.
                names = [n.strip().lstrip("%") for b in branches for n in b.split(",")]
                costs = [count(n) for n in names if n]
                totals = [sum(c) for c in costs]
                pick = costs[branch(totals)] if branch else max(costs, key=sum)
                conv, dot = conv + pick[0], dot + pick[1]
            trip = _TRIP_COUNT.search(rest) if opcode == "while" else None
            times = int(trip.group(1)) if trip else 1
            called = [count(callee) for callee in _CALLEES.findall(rest)]
            for c, d in called:
                conv, dot = conv + times * c, dot + times * d
            if opcode == "while" and not trip:
                result.unknown_trip_counts[inst] = sum(c + d for c, d in called)
        memo[name] = (conv, dot)
        return memo[name]

    result.conv, result.dot = count(entry)
    return result
