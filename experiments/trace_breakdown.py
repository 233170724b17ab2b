"""Where a compiled step's time goes: a ``jax.profiler`` trace summed by HLO instruction.

On the CPU each HLO instruction that XLA runs as a thunk (fusions, gathers,
scatters, sorts, dots, loops) is one trace event named after the instruction;
its ``op_name`` metadata in the compiled HLO says which JAX code it came from
(``jit(train_step)/transpose(jvp(MaskRCNN.losses))/MaskRCNN.box_head/...``).
XLA:CPU's own convolutions are not trace events, so the parts sum to less than
the step. Used by ``bench_trained_step --trace`` (PROFILE_shapes.md's tables).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.-]+) = .*?op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> ``op_name`` metadata, for every instruction of a compiled
    HLO module's text (``compiled.as_text()``) that carries one."""
    names = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            names[m.group(1)] = m.group(2)
    return names


def part_of(op_name: str) -> tuple[str, str]:
    """(module, ``"backward"`` or ``"forward"``) of one ``op_name``.

    The module is the first ``MaskRCNN.<name>`` in the path other than the
    ``losses`` method (``box_head``, ``mask_head``, ``proposals`` ...), else the
    path without the jitted function's name, ``MaskRCNN.losses`` and the jit /
    transpose / jvp / vmap wrappers (``argsort/sort``; at most 40 characters).
    Backward: under ``transpose(jvp(...))``, JAX's name for the VJP.
    """
    direction = "backward" if "transpose(jvp(" in op_name else "forward"
    modules = [m for m in re.findall(r"MaskRCNN\.(\w+)", op_name) if m != "losses"]
    if modules:
        return modules[0], direction
    path = re.sub(r"\b(?:jit|transpose|jvp|vmap)\(|\)", "", op_name).split("/")[1:]
    return "/".join(p for p in path if p and p != "MaskRCNN.losses")[:40], direction


def summarize(trace_dir: str, names: dict[str, str], steps: int):
    """Microseconds per step of each instruction, and of each (module, direction).

    Args:
      trace_dir: the directory given to ``jax.profiler.start_trace`` (its newest
        ``*.trace.json.gz`` is read).
      names: :func:`hlo_op_names` of the traced executable; events of other names
        (the runtime's own, Python's) are left out.
      steps: how many steps the trace holds (the sums are divided by it).

    Returns:
      (per_instruction, per_part): ``Counter``s of microseconds per step, keyed by
      instruction name and by :func:`part_of`.

    Raises:
      FileNotFoundError: no trace file under ``trace_dir``.
    """
    paths = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        events = json.load(f)["traceEvents"]
    per_instruction: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            per_instruction[e["name"]] += e.get("dur", 0) / steps
    per_part: collections.Counter = collections.Counter()
    for name, us in per_instruction.items():
        per_part[part_of(names[name])] += us
    return per_instruction, per_part


def format_summary(per_instruction, per_part, names, top: int = 15) -> str:
    """The ``top`` instructions and every part with at least 1 ms, in milliseconds."""
    lines = [f"traced instructions: {sum(per_instruction.values()) / 1e3:.0f} ms a step"]
    lines += ["  ms  part"]
    lines += [
        f"{us / 1e3:6.1f}  {module} ({direction})"
        for (module, direction), us in per_part.most_common()
        if us >= 1e3
    ]
    lines += ["  ms  instruction  op_name"]
    lines += [
        f"{us / 1e3:6.1f}  {name}  {names[name][:120]}"
        for name, us in per_instruction.most_common(top)
    ]
    return "\n".join(lines)
