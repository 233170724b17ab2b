"""RoIPool against RoIAlign (reference impl), same process, same boxes and levels.

Run:  .venv/bin/python experiments/bench_roi_pool.py [--device-shapes] [--repeats N]

Default shapes are the CPU shapes config's RoI heads: 8 images x 128 boxes,
64 channels, P2..P5 of a 128x128 input, output 7x7 (box head) and 14x14 (mask
head). ``--device-shapes`` uses the COCO model's (2 images x 512 boxes, 256
channels, P2..P5 of 800x1088) for a GPU run. Prints compile time, temp memory
(XLA's estimate) and the steady-state median of forward and of the gradient
of a scalar loss, and the pool / align ratios. Timings on a shared CPU are
noisy; compare the ratios, from the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops import assign_levels, flatten_levels
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.ops.roi_pool import roi_pool_levels


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _random_boxes(rng, batch, num, image_hw):
    h, w = image_hw
    xy = rng.uniform(0, 1, size=(batch, num, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(8), np.log(min(h, w) / 2), size=(batch, num, 2)))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device_shapes:
        batch, num, channels, image_hw = 2, 512, 256, (800, 1088)
    else:
        batch, num, channels, image_hw = 8, 128, 64, (128, 128)
    strides = (4, 8, 16, 32)
    rng = np.random.default_rng(0)
    feats = [
        jnp.asarray(
            rng.normal(size=(batch, image_hw[0] // s, image_hw[1] // s, channels)), jnp.float32
        )
        for s in strides
    ]
    flat, shapes = flatten_levels(feats)
    shapes = tuple(shapes)
    scales = tuple(1.0 / s for s in strides)
    boxes = jnp.asarray(_random_boxes(rng, batch, num, image_hw))
    levels = assign_levels(boxes)
    print(
        f"backend {jax.default_backend()}, {batch} images x {num} boxes, C={channels}, "
        f"levels {shapes}"
    )

    for out in (7, 14):
        ops = {"pool": roi_pool_levels, "align": roi_align_levels}
        results = {}
        for name, op in ops.items():

            def fwd(x, op=op, out=out):
                return op(x, boxes, levels, shapes, scales, out)

            grad = jax.grad(lambda x, fwd=fwd: jnp.sum(fwd(x) ** 2))
            for kind, fn in (("fwd", fwd), ("grad", grad)):
                t0 = time.perf_counter()
                compiled = jax.jit(fn).lower(flat).compile()
                compile_s = time.perf_counter() - t0
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                jax.block_until_ready(compiled(flat))
                run = _median_time(lambda compiled=compiled: compiled(flat), args.repeats)
                results[name, kind] = run
                print(
                    f"{out}x{out} {name:5s} {kind:4s}: compile {compile_s:6.1f} s, "
                    f"temp {temp:8.1f} MiB, median {run * 1e3:8.1f} ms"
                )
        for kind in ("fwd", "grad"):
            ratio = results["pool", kind] / results["align", kind]
            print(f"{out}x{out} pool / align {kind}: {ratio:.2f}")


if __name__ == "__main__":
    main()
