"""RoIAlign benchmark: ours (jitted, steady state) against torchvision, same process.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_ops [--impl reference|pallas] [--device-shapes]

Default shapes are the box head's on this CPU: 2 images x 500 boxes, 256
channels, one 200x272 level (stride 4), output 7x7 and 14x14, sampling_ratio 2.
``--device-shapes`` uses the model's shapes for a GPU run (1000 boxes per
image, P2..P5 of an 800x1088 input, multi-level). Compile time is reported
separately and excluded from the steady-state figures (median of repeats).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _random_boxes(rng, batch, num, image_hw):
    h, w = image_hw
    xy = rng.uniform(0, 1, size=(batch, num, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(8), np.log(min(h, w) / 2), size=(batch, num, 2)))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def bench(impl: str, device_shapes: bool, repeats: int) -> list[dict]:
    from maskrcnn_jax import ops

    rng = np.random.default_rng(0)
    batch, channels = 2, 256
    if device_shapes:
        num, image_hw, strides = 1000, (800, 1088), (4, 8, 16, 32)
    else:
        num, image_hw, strides = 500, (800, 1088), (4,)
    feats = [
        rng.normal(size=(batch, image_hw[0] // s, image_hw[1] // s, channels)).astype(np.float32)
        for s in strides
    ]
    boxes = _random_boxes(rng, batch, num, image_hw)
    jfeats = [jnp.asarray(f) for f in feats]
    jboxes = jnp.asarray(boxes)

    try:
        import torch
        import torchvision

        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        tfeats = [torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().to(tdev) for f in feats]
        tboxes = [torch.from_numpy(b).to(tdev) for b in boxes]
    except ImportError:  # torchvision is a test-only dependency
        torch = None

    rows = []
    for out in (7, 14):

        def ours_fwd(fs, b):
            return ops.multilevel_roi_align(fs, b, out, strides, 2, impl=impl)

        # Forward + backward = the output and the gradient w.r.t. the features
        # for a given upstream cotangent, as inside a training step.
        cot = rng.normal(size=(batch, num, out, out, channels)).astype(np.float32)
        jcot = jnp.asarray(cot)

        def ours_fwd_bwd(fs, b, ct):
            y, vjp = jax.vjp(lambda f: ours_fwd(f, b), fs)
            return y, vjp(ct)[0]

        fwd = jax.jit(ours_fwd)
        fwd_bwd = jax.jit(ours_fwd_bwd)
        t0 = time.perf_counter()
        fwd.lower(jfeats, jboxes).compile()
        fwd_bwd.lower(jfeats, jboxes, jcot).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(fwd(jfeats, jboxes))
        jax.block_until_ready(fwd_bwd(jfeats, jboxes, jcot))
        ours_f = _median_time(lambda: jax.block_until_ready(fwd(jfeats, jboxes)), repeats)
        ours_fb = _median_time(
            lambda: jax.block_until_ready(fwd_bwd(jfeats, jboxes, jcot)), repeats
        )

        tv_f = tv_fb = float("nan")
        if torch is not None:
            tcot = torch.from_numpy(cot.reshape(batch * num, out, out, channels))
            tcot = tcot.permute(0, 3, 1, 2).contiguous().to(tdev)

            if len(strides) == 1:
                def tv_forward(req_grad):
                    f = tfeats[0].detach().requires_grad_(req_grad)
                    return f, torchvision.ops.roi_align(f, tboxes, out, 1 / strides[0], 2)
            else:
                pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], out, 2)

                def tv_forward(req_grad):
                    fs = {str(i): f.detach().requires_grad_(req_grad) for i, f in enumerate(tfeats)}
                    return list(fs.values()), pooler(fs, tboxes, [image_hw] * batch)

            def sync():
                if tdev == "cuda":
                    torch.cuda.synchronize()

            def tv_f_run():
                with torch.no_grad():
                    tv_forward(False)
                sync()

            def tv_fb_run():
                fs, y = tv_forward(True)
                y.backward(tcot)
                sync()

            tv_f_run()
            tv_fb_run()
            tv_f = _median_time(tv_f_run, repeats)
            tv_fb = _median_time(tv_fb_run, repeats)
        rows.append(
            dict(out=out, compile_s=compile_s, ours_f=ours_f, tv_f=tv_f, ours_fb=ours_fb, tv_fb=tv_fb)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="reference", choices=["reference", "pallas"])
    parser.add_argument("--device-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = bench(args.impl, args.device_shapes, args.repeats)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} impl={args.impl}")
    print(
        f"{'output':>6} {'compile s':>9} {'fwd ours s':>10} {'fwd tv s':>9} {'ratio':>6}"
        f" {'f+b ours s':>10} {'f+b tv s':>9} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['out']:>4}x{r['out']:<1} {r['compile_s']:9.2f} {r['ours_f']:10.4f} {r['tv_f']:9.4f}"
            f" {r['ours_f'] / r['tv_f']:6.3f} {r['ours_fb']:10.4f} {r['tv_fb']:9.4f}"
            f" {r['ours_fb'] / r['tv_fb']:6.3f}"
        )


if __name__ == "__main__":
    main()
