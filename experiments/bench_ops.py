"""RoIAlign benchmark: ours (jitted, steady state) against torchvision, same process.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_ops [--impl reference|pallas|einsum]
          [--device-shapes] [--large-boxes] [--dtype float32|bfloat16]

Default shapes are the box head's on this CPU: 2 images x 500 boxes, 256
channels, one 200x272 level (stride 4), output 7x7 and 14x14, sampling_ratio 2.
``--device-shapes`` uses the model's shapes for a GPU run (1000 boxes per
image, P2..P5 of an 800x1088 input, multi-level). ``--large-boxes`` draws
boxes of 8-300 px, all pooled from the stride-4 level, the worst case of the
einsum form (its cost grows with the level's size, not the box's). Compile
time is reported separately and excluded from the steady-state figures
(median of repeats). Peak memory is XLA's own account of one call
(``compiled.memory_analysis()``: arguments + outputs + temporaries), not a
process-wide peak. The einsum form may well be slower than the reference on
a CPU: it is written for the TPU's matrix units; no goal here.

:func:`make_inputs`, :func:`time_impl` and :func:`time_torchvision` are
reused by ``experiments/device_check.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("reference", "pallas", "einsum")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def random_boxes(rng, batch, num, image_hw, min_side=8.0, max_side=None) -> np.ndarray:
    """Boxes [batch, num, 4] xyxy input pixels, sides log-uniform in [min_side, max_side].

    ``max_side`` defaults to half the shorter image side. Boxes are clipped to the image.
    """
    h, w = image_hw
    max_side = max_side or min(h, w) / 2
    xy = rng.uniform(0, 1, size=(batch, num, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(min_side), np.log(max_side), size=(batch, num, 2)))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def make_inputs(
    batch: int,
    num: int,
    image_hw: tuple[int, int],
    strides: tuple[int, ...],
    channels: int,
    large_boxes: bool = False,
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Random features and boxes.

    Returns:
      features: per level [batch, H / s, W / s, channels] float32 N(0, 1);
      boxes: [batch, num, 4] xyxy input pixels (8-300 px with ``large_boxes``,
      else 8 px to half the shorter side).
    """
    rng = np.random.default_rng(seed)
    feats = [
        rng.normal(size=(batch, -(-image_hw[0] // s), -(-image_hw[1] // s), channels)).astype(
            np.float32
        )
        for s in strides
    ]
    max_side = 300.0 if large_boxes else None
    return feats, random_boxes(rng, batch, num, image_hw, 8.0, max_side)


def _memory_bytes(compiled) -> float:
    """Arguments + outputs + temporaries of one call, minus donated (aliased) bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends have no analysis
        return float("nan")
    if m is None:
        return float("nan")
    return float(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def time_impl(
    impl: str,
    feats: list[np.ndarray],
    boxes: np.ndarray,
    out: int,
    strides: tuple[int, ...],
    repeats: int,
    dtype: str = "float32",
    sampling_ratio: int = 2,
    seed: int = 1,
) -> dict:
    """Compiles and times ``multilevel_roi_align(impl=impl)``, forward and forward+backward.

    Forward + backward is the output and the gradient w.r.t. the features for
    a given upstream cotangent, as inside a training step. With one level
    every box is pooled from it (``single_level_roi_align``-like, via
    ``strides`` of length 1).

    Returns:
      ``compile_s``, ``fwd_s``, ``fb_s`` (median seconds), ``fwd_mem_mb``,
      ``fb_mem_mb`` (XLA's memory of one call, MB).
    """
    from maskrcnn_jax import ops

    jfeats = [jnp.asarray(f, dtype) for f in feats]
    jboxes = jnp.asarray(boxes)
    rng = np.random.default_rng(seed)
    jcot = jnp.asarray(rng.normal(size=(*boxes.shape[:2], out, out, feats[0].shape[-1])), dtype)

    def fwd(fs, b):
        if len(strides) == 1:
            return ops.roi_align(fs[0], b, out, 1.0 / strides[0], sampling_ratio, impl=impl)
        return ops.multilevel_roi_align(fs, b, out, strides, sampling_ratio, impl=impl)

    def fwd_bwd(fs, b, ct):
        y, vjp = jax.vjp(lambda f: fwd(f, b), fs)
        return y, vjp(ct)[0]

    t0 = time.perf_counter()
    f_c = jax.jit(fwd).lower(jfeats, jboxes).compile()
    fb_c = jax.jit(fwd_bwd).lower(jfeats, jboxes, jcot).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(f_c(jfeats, jboxes))
    jax.block_until_ready(fb_c(jfeats, jboxes, jcot))
    return {
        "compile_s": compile_s,
        "fwd_s": _median_time(lambda: jax.block_until_ready(f_c(jfeats, jboxes)), repeats),
        "fb_s": _median_time(lambda: jax.block_until_ready(fb_c(jfeats, jboxes, jcot)), repeats),
        "fwd_mem_mb": _memory_bytes(f_c) / 2**20,
        "fb_mem_mb": _memory_bytes(fb_c) / 2**20,
    }


def time_torchvision(
    feats: list[np.ndarray],
    boxes: np.ndarray,
    out: int,
    strides: tuple[int, ...],
    image_hw: tuple[int, int],
    repeats: int,
    dtype: str = "float32",
    require_cuda: bool = False,
    sampling_ratio: int = 2,
    seed: int = 1,
) -> dict | None:
    """torchvision's ``roi_align`` / ``MultiScaleRoIAlign``, forward and forward+backward.

    Runs on CUDA when available, else on the CPU, in float32 whatever ``dtype``
    (for bfloat16 that is what torchvision's autocast does). Returns None without torch
    (a test-only dependency here), or without CUDA when ``require_cuda``.

    Returns:
      ``fwd_s``, ``fb_s`` (median seconds) and ``device``.
    """
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        return None
    dev = "cuda" if cuda else "cpu"
    # bfloat16 compares with what torchvision's AMP does: its autocast rule runs
    # roi_align in float32 (its kernels have no bfloat16 on the CPU).
    tdtype = {"float32": torch.float32, "bfloat16": torch.float32}[dtype]
    tfeats = [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().to(dev, tdtype) for f in feats]
    tboxes = [torch.from_numpy(b).to(dev, tdtype) for b in boxes]
    rng = np.random.default_rng(seed)
    cot = rng.normal(size=(boxes.shape[0] * boxes.shape[1], feats[0].shape[-1], out, out))
    tcot = torch.from_numpy(cot.astype(np.float32)).to(dev, tdtype)
    batch = boxes.shape[0]

    if len(strides) == 1:

        def forward(req_grad):
            f = tfeats[0].detach().requires_grad_(req_grad)
            return f, torchvision.ops.roi_align(f, tboxes, out, 1 / strides[0], sampling_ratio)
    else:
        names = [str(i) for i in range(len(strides))]
        pooler = torchvision.ops.MultiScaleRoIAlign(names, out, sampling_ratio)

        def forward(req_grad):
            fs = {n: f.detach().requires_grad_(req_grad) for n, f in zip(names, tfeats)}
            return list(fs.values()), pooler(fs, tboxes, [tuple(image_hw)] * batch)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def f_run():
        with torch.no_grad():
            forward(False)
        sync()

    def fb_run():
        _, y = forward(True)
        y.backward(tcot)
        sync()

    f_run()
    fb_run()
    fwd_s, fb_s = _median_time(f_run, repeats), _median_time(fb_run, repeats)
    return {"fwd_s": fwd_s, "fb_s": fb_s, "device": dev}


def bench(
    impl: str,
    device_shapes: bool,
    repeats: int,
    large_boxes: bool = False,
    dtype: str = "float32",
) -> list[dict]:
    """One row per output size (7, 14): our times and memory beside torchvision's."""
    batch, channels = 2, 256
    image_hw = (800, 1088)
    if large_boxes:
        num, strides = 500, (4,)
    elif device_shapes:
        num, strides = 1000, (4, 8, 16, 32)
    else:
        num, strides = 500, (4,)
    feats, boxes = make_inputs(batch, num, image_hw, strides, channels, large_boxes)
    rows = []
    for out in (7, 14):
        ours = time_impl(impl, feats, boxes, out, strides, repeats, dtype)
        tv = time_torchvision(feats, boxes, out, strides, image_hw, repeats, dtype) or {
            "fwd_s": float("nan"),
            "fb_s": float("nan"),
            "device": "-",
        }
        rows.append(dict(out=out, ours=ours, tv=tv))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="reference", choices=IMPLS)
    parser.add_argument("--device-shapes", action="store_true")
    parser.add_argument("--large-boxes", action="store_true", help="boxes 8-300 px at stride 4")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = bench(args.impl, args.device_shapes, args.repeats, args.large_boxes, args.dtype)
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} impl={args.impl}"
        f" dtype={args.dtype} large_boxes={args.large_boxes}"
        f" torchvision on {rows[0]['tv']['device']}"
    )
    print(
        f"{'output':>6} {'compile s':>9} {'fwd ours s':>10} {'fwd tv s':>9} {'ratio':>6}"
        f" {'f+b ours s':>10} {'f+b tv s':>9} {'ratio':>6} {'fwd MB':>8} {'f+b MB':>8}"
    )
    for r in rows:
        o, t = r["ours"], r["tv"]
        print(
            f"{r['out']:>4}x{r['out']:<1} {o['compile_s']:9.2f} {o['fwd_s']:10.4f}"
            f" {t['fwd_s']:9.4f}"
            f" {o['fwd_s'] / t['fwd_s']:6.3f} {o['fb_s']:10.4f} {t['fb_s']:9.4f}"
            f" {o['fb_s'] / t['fb_s']:6.3f} {o['fwd_mem_mb']:8.0f} {o['fb_mem_mb']:8.0f}"
        )


if __name__ == "__main__":
    main()
