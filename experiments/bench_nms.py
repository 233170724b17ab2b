"""NMS benchmark: the tiled NMS against the N-step ``fori_loop`` one, and torchvision.

Run:  .venv/bin/python experiments/bench_nms.py [--sizes 1000 2000 4000] [--repeats 7]
      [--tile-sizes 128] [--batch 8] [--stat median|min] [--no-torch] [--no-rpn]

For each N: one image (``nms``) and a batch of ``--batch`` images vmapped as
the RPN does, both jitted; compile time is listed separately and excluded
from the figure, the median (``--stat min``: minimum) of ``--repeats`` warm
calls. The boxes look like RPN proposals: clusters of jittered boxes around a few objects plus scattered
ones, in an 800x1067 image, IoU threshold 0.7, every box valid,
``max_outputs = N``. A last case is the RPN of the shapes recipe (see ``run``). Every run checks that both JAX methods keep the same
boxes. torchvision.ops.nms (CPU, or CUDA when present) is timed for
orientation if torch is installed; ``run`` imports it only then.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops import nms

IMAGE_HW = (800, 1067)
IOU_THRESHOLD = 0.7


def cpu_model() -> str:
    """CPU model name, family/model numbers and core count, from /proc/cpuinfo.

    Virtual machines often report only "AMD EPYC"; the family and model tell
    the generation (family 23 = Zen 1/2, 25 = Zen 3/4).
    """
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown"
    fam = f", family {info['cpu family']} model {info['model']}" if "cpu family" in info else ""
    return f"{name}{fam}, {os.cpu_count()} logical CPUs"


def rpn_like_boxes(rng: np.random.Generator, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [batch, n, 4] xyxy and scores [batch, n] resembling RPN proposals.

    Three quarters of the boxes jitter around 30 objects per image (heavy
    mutual overlap, long suppression chains), the rest are scattered.
    """
    h, w = IMAGE_HW
    num_obj = 30
    centers = rng.uniform(0, 1, size=(batch, num_obj, 2)) * [w, h]
    sizes = np.exp(rng.uniform(np.log(16), np.log(400), size=(batch, num_obj, 2)))
    obj = rng.integers(0, num_obj, size=(batch, n))
    take = functools.partial(np.take_along_axis, axis=1)
    size = take(sizes, obj[..., None])
    c = take(centers, obj[..., None]) + rng.normal(size=(batch, n, 2)) * size * 0.15
    s = size * np.exp(rng.normal(size=(batch, n, 2)) * 0.15)
    scattered = rng.uniform(size=(batch, n)) < 0.25
    c = np.where(scattered[..., None], rng.uniform(0, 1, size=(batch, n, 2)) * [w, h], c)
    boxes = np.concatenate([c - s / 2, c + s / 2], axis=-1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    scores = rng.uniform(size=(batch, n)).astype(np.float32)
    return boxes, scores


STATS = {"median": np.median, "min": np.min}


def _time(fn, repeats: int, stat: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(STATS[stat](times))


# The RPN of experiments/shapes.py in training: 8 images x 5 FPN levels, the
# best 1,000 anchors per level, of which a 128x128 input has this many.
RPN_RECIPE_VALID = (1000, 768, 192, 48, 12)


def _compiled(method: str, tile_size: int, n: int, args) -> tuple[object, float]:
    """NMS jitted and vmapped over the leading dims of ``args`` (boxes, scores, valid), compiled.

    Returns the compiled function and the compile seconds.
    """

    def f(boxes, scores, valid):
        return nms(boxes, scores, IOU_THRESHOLD, n, valid, method=method, tile_size=tile_size)

    for _ in range(args[0].ndim - 2):
        f = jax.vmap(f)
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _jax_time(compiled, args, repeats: int, stat: str) -> float:
    return _time(lambda: jax.block_until_ready(compiled(*args)), repeats, stat)


def _torch_nms_time(boxes, scores, valid, repeats: int, stat: str) -> tuple[float, str]:
    """Seconds of torchvision.ops.nms over the valid boxes of each image, one call each."""
    try:
        import torch
        import torchvision
    except ImportError:
        return float("nan"), "-"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    boxes, scores, valid = (
        boxes.reshape(-1, *boxes.shape[-2:]),
        scores.reshape(-1, scores.shape[-1]),
        valid.reshape(-1, valid.shape[-1]),
    )
    tb = [torch.from_numpy(b[v]).to(dev) for b, v in zip(boxes, valid)]
    ts = [torch.from_numpy(s[v]).to(dev) for s, v in zip(scores, valid)]

    def call():
        out = [torchvision.ops.nms(b, s, IOU_THRESHOLD) for b, s in zip(tb, ts)]
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    return _time(call, repeats, stat), dev


def _measure(case, boxes, scores, valid, tile_sizes, repeats, stat, with_torch) -> dict:
    """Times one case: boxes [..., N, 4], scores and valid [..., N]; one NMS per leading index."""
    n = boxes.shape[-2]
    args = tuple(jnp.asarray(x) for x in (boxes, scores, valid))
    loop, loop_compile_s = _compiled("loop", 1, n, args)
    ref_idx, ref_valid = loop(*args)
    row = {
        "n": n,
        "batch": case,
        "loop_s": _jax_time(loop, args, repeats, stat),
        "loop_compile_s": loop_compile_s,
        "tiled_s": {},
        "tiled_compile_s": {},
        "ratio": {},
        "kept": float(np.asarray(ref_valid).sum()) / max(1, int(np.prod(boxes.shape[:-2]))),
        "jax_device": str(jax.devices()[0].device_kind),
    }
    for t in tile_sizes:
        tiled, row["tiled_compile_s"][t] = _compiled("tiled", t, n, args)
        idx, ok = tiled(*args)
        if not (
            np.array_equal(np.asarray(ok), np.asarray(ref_valid))
            and np.array_equal(np.asarray(idx), np.asarray(ref_idx))
        ):
            raise RuntimeError(f"bench_nms: tiled (tile {t}) != loop at N={n}, batch {case}")
        row["tiled_s"][t] = _jax_time(tiled, args, repeats, stat)
        row["ratio"][t] = row["tiled_s"][t] / row["loop_s"]
    row["torch_s"], row["torch_device"] = (
        _torch_nms_time(boxes, scores, valid, repeats, stat) if with_torch else (float("nan"), "-")
    )
    return row


def run(
    sizes=(1000, 2000, 4000),
    repeats: int = 7,
    batch: int = 8,
    tile_sizes=(128,),
    with_torch: bool = True,
    stat: str = "median",
    rpn_recipe: bool = True,
) -> list[dict]:
    """Times loop vs tiled NMS; one dict per case with seconds and ratios.

    Cases: for each N one image, un-vmapped (``batch`` 1), and ``batch``
    images vmapped; with ``rpn_recipe`` also the RPN of the shapes recipe
    (``batch`` "8x5": 8 images x 5 levels of 1,000 boxes, of which
    ``RPN_RECIPE_VALID`` are valid), vmapped twice as the model does.

    Keys: ``n``, ``batch``, ``loop_s``, ``loop_compile_s``, ``tiled_s``,
    ``tiled_compile_s`` and ``ratio`` (tiled / loop), the last three dicts
    keyed by tile size, ``kept`` (mean boxes kept per NMS call), ``torch_s``
    (all the case's calls, one by one) and ``torch_device`` (NaN / "-" without
    torch), ``jax_device``. Times are the ``stat`` ("median" or "min") of
    ``repeats`` warm calls. Raises RuntimeError if the two methods disagree.
    """
    if stat not in STATS:
        raise ValueError(f"bench_nms: stat must be one of {sorted(STATS)}, got {stat!r}")
    rng = np.random.default_rng(0)
    measure = functools.partial(
        _measure, tile_sizes=tile_sizes, repeats=repeats, stat=stat, with_torch=with_torch
    )
    rows = []
    for n in sizes:
        boxes, scores = rpn_like_boxes(rng, batch, n)
        valid = np.ones(scores.shape, bool)
        rows.append(measure(1, boxes[0], scores[0], valid[0]))
        rows.append(measure(batch, boxes, scores, valid))
    if rpn_recipe:
        levels, n = len(RPN_RECIPE_VALID), max(RPN_RECIPE_VALID)
        boxes, scores = rpn_like_boxes(rng, 8 * levels, n)
        valid = np.arange(n) < np.tile(RPN_RECIPE_VALID, 8)[:, None]
        shape = (8, levels, n)
        rows.append(
            measure(
                f"8x{levels}",
                boxes.reshape(*shape, 4),
                scores.reshape(shape),
                valid.reshape(shape),
            )
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    tiles = sorted({t for r in rows for t in r["tiled_s"]})
    head = ["N", "batch", "kept/call", "loop ms"]
    head += [f"tiled{t} ms" for t in tiles] + [f"tiled{t}/loop" for t in tiles]
    head += ["torchvision ms", "compile s loop"] + [f"compile s tiled{t}" for t in tiles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"]), str(r["batch"]), f"{r['kept']:.0f}", f"{r['loop_s'] * 1e3:.1f}"]
        cells += [f"{r['tiled_s'][t] * 1e3:.1f}" for t in tiles]
        cells += [f"{r['ratio'][t]:.2f}" for t in tiles]
        cells += [f"{r['torch_s'] * 1e3:.1f} ({r['torch_device']})"]
        cells += [f"{r['loop_compile_s']:.1f}"]
        cells += [f"{r['tiled_compile_s'][t]:.1f}" for t in tiles]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tile-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--no-torch", action="store_true", help="skip the torchvision timing")
    p.add_argument("--no-rpn", action="store_true", help="skip the RPN recipe case")
    p.add_argument(
        "--stat", choices=sorted(STATS), default="median", help="min is steadier on a busy machine"
    )
    a = p.parse_args()
    rows = run(
        a.sizes, a.repeats, a.batch, tuple(a.tile_sizes), not a.no_torch, a.stat, not a.no_rpn
    )
    print(f"CPU: {cpu_model()}; JAX device: {rows[0]['jax_device']}; jax {jax.__version__}")
    print(
        f"IoU threshold {IOU_THRESHOLD}, {a.stat} of {a.repeats} warm calls; "
        "torchvision: one call per image (or level)"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
