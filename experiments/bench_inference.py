"""Inference latency on CPU: our Predictor against torchvision's eval forward, same weights.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_inference [--repeats 5] [--size 480x640]
          [--box-score-thresh 0.05]

Both models hold the same random weights (the parity test's randomisation:
``maskrcnn_resnet50_fpn`` with every parameter and buffer drawn, so that the
heads produce a realistic number of detections). One synthetic image (default
480x640, resized to 800x1066 by both) goes through

- ours: the whole ``Predictor.__call__`` (host resize, padding into the
  800x1088 bucket, one jitted call, box rescaling and mask pasting);
- torchvision: ``model([image])`` in eval mode under ``torch.no_grad()``.

Reported: compile time (first call minus steady state), steady-state median
latency of each (timed interleaved), their ratio, the backbone+FPN time of each alone (and so the
share of time outside the convolutional trunk), detections per image, and peak
resident memory (``ru_maxrss``) after each phase.
"""

from __future__ import annotations

import argparse
import os
import resource
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


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="480x640", help="HxW of the input image")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--box-score-thresh",
        type=float,
        default=0.05,
        help="raise it (e.g. 0.9) to see both sides with fewer detections",
    )
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    import torch
    import torchvision

    from maskrcnn_jax.torchvision_weights import (
        config_from_state_dict,
        convert_torchvision_state_dict,
    )
    from maskrcnn_jax.inference import Predictor
    from maskrcnn_jax import xla_options
    from maskrcnn_jax.modeling import MaskRCNN
    from tests.test_parity import randomize_torchvision, synthetic_image

    torch.set_num_threads(args.threads)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    randomize_torchvision(tv, seed=0)
    tv.eval()
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    tv.roi_heads.score_thresh = args.box_score_thresh
    config = config_from_state_dict(state, box_score_thresh=args.box_score_thresh)
    variables = convert_torchvision_state_dict(state, config)
    image = synthetic_image(h, w, seed=0)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"{args.threads} threads, image {h}x{w}, roi_align_impl={config.roi_align_impl}"
    )

    # Compile / warm up both, then time them interleaved (the machine may be
    # shared: alternating keeps load changes from favouring one side).
    predictor = Predictor(variables, config)
    t0 = time.perf_counter()
    result = predictor([image])[0]
    first = time.perf_counter() - t0
    resized = predictor.preprocess(image)[1]
    bucket = predictor.bucket_for(resized)
    model = MaskRCNN(config)
    feats_fn = xla_options.jit(lambda v, x, s: model.apply(v, x, s, method=MaskRCNN.features))
    x = jnp.zeros((1, *bucket, 3), jnp.float32)
    s = jnp.asarray([resized], jnp.int32)
    jax.block_until_ready(feats_fn(predictor.variables, x, s))
    ours_rss = _maxrss_mb()
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ref = tv([tensor])[0]
        batch, _ = tv.transform([tensor])
        tv.backbone(batch.tensors)
    timings: dict[str, list[float]] = {"ours": [], "tv": [], "ours_trunk": [], "tv_trunk": []}
    calls = {
        "ours": lambda: predictor([image]),
        "tv": lambda: tv([tensor]),
        "ours_trunk": lambda: jax.block_until_ready(feats_fn(predictor.variables, x, s)),
        "tv_trunk": lambda: tv.backbone(batch.tensors),
    }
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in timings.items()}
    ours, theirs = med["ours"], med["tv"]
    pair_ratio = float(np.median(np.array(timings["ours"]) / np.array(timings["tv"])))
    print(
        f"ours:        {ours * 1e3:8.1f} ms/image; first call {first:.1f} s "
        f"(compile ~{first - ours:.1f} s); {len(result['scores'])} detections; "
        f"resized {resized} in bucket {bucket}"
    )
    print(
        f"ours trunk:  {med['ours_trunk'] * 1e3:8.1f} ms (backbone+FPN); "
        f"{100 * (1 - med['ours_trunk'] / ours):.0f}% of the call is outside it"
    )
    print(
        f"torchvision: {theirs * 1e3:8.1f} ms/image; {len(ref['scores'])} detections; "
        f"padded {tuple(batch.tensors.shape[-2:])}"
    )
    print(
        f"tv trunk:    {med['tv_trunk'] * 1e3:8.1f} ms (backbone+FPN); "
        f"{100 * (1 - med['tv_trunk'] / theirs):.0f}% of the call is outside it"
    )
    print(f"peak RSS: {ours_rss:.0f} MB after ours, {_maxrss_mb():.0f} MB after torchvision")
    print(
        f"ratio ours / torchvision: {ours / theirs:.2f} (medians), {pair_ratio:.2f} "
        f"(median of interleaved pairs); goal <= 0.6 (issue 15)"
    )
    print("all timings (ms):", {k: [round(t * 1e3) for t in v] for k, v in timings.items()})


if __name__ == "__main__":
    main()
