"""Latency of an exported artifact (serving.ExportedPredictor) next to Predictor, one run.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_serving [--repeats 7] [--size 240x320]
          [--min_size 320] [--max_size 512]

Both run the same random-weight torchvision ``maskrcnn_resnet50_fpn`` (the
parity test's randomisation, converted) on one synthetic image, through the
same host code (resize, bucket padding, paste): ``Predictor`` calls the jitted
Flax model, ``ExportedPredictor`` the deserialised ``jax.export`` function
(exported here for the current platform and the image's bucket only, to keep
the run short). Timed interleaved after a warm-up call each; prints compile /
load time, median ms per image of each and their ratio (expected ~1.0: the
same XLA computation).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", default="240x320", help="HxW of the input image")
    parser.add_argument("--min_size", type=int, default=320)
    parser.add_argument("--max_size", type=int, default=512)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    import torchvision

    from maskrcnn_jax import export, serving
    from maskrcnn_jax.inference import Predictor
    from maskrcnn_jax.torchvision_weights import (
        config_from_state_dict,
        convert_torchvision_state_dict,
    )
    from tests.test_parity import randomize_torchvision, synthetic_image

    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    randomize_torchvision(tv, seed=0)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    config = config_from_state_dict(
        state, min_size=args.min_size, max_size=args.max_size, roi_align_impl="reference"
    )
    variables = convert_torchvision_state_dict(state, config)
    image = synthetic_image(h, w, seed=0)
    platform = serving.current_platform()
    print(f"jax {jax.__version__} on {platform}, image {h}x{w}, min/max {args.min_size}/"
          f"{args.max_size}")  # fmt: skip

    predictor = Predictor(variables, config)
    bucket = predictor.bucket_for(predictor.preprocess(image)[1])
    t0 = time.perf_counter()
    ours = predictor([image])[0]
    first_jit = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        manifest = export.export_model(variables, config, out, (platform,), buckets=[bucket])
        export_s = time.perf_counter() - t0
        size_mb = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
        t0 = time.perf_counter()
        exported = serving.ExportedPredictor(out)
        got = exported([image])[0]
        first_exported = time.perf_counter() - t0
        calls = {"predictor": lambda: predictor([image]), "exported": lambda: exported([image])}
        timings: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in timings.items()}
    same = np.array_equal(ours["labels"], got["labels"]) and np.allclose(
        ours["boxes"], got["boxes"], atol=1e-4
    )
    print(f"export: {export_s:.1f} s, artifact {size_mb:.1f} MB, bucket {bucket}")
    print(f"first call: Predictor {first_jit:.1f} s (jit compile), "
          f"ExportedPredictor {first_exported:.1f} s (load + compile)")  # fmt: skip
    print(f"Predictor:         {med['predictor'] * 1e3:8.1f} ms/image ({len(ours['labels'])} det)")
    print(f"ExportedPredictor: {med['exported'] * 1e3:8.1f} ms/image ({len(got['labels'])} det, "
          f"same detections: {same})")  # fmt: skip
    print(f"ratio exported / Predictor: {med['exported'] / med['predictor']:.3f}")
    print("all timings (ms):", {k: [round(t * 1e3) for t in v] for k, v in timings.items()})


if __name__ == "__main__":
    main()
