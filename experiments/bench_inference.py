"""Inference latency on CPU: our Predictor against torchvision's eval forward, same weights.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_inference [--repeats 5] [--size 480x640]
          [--box-score-thresh 0.05] [--stages]

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

``--stages`` also times each stage of both on the same input, interleaved
(medians), with its convolution and matmul GFLOP and GFLOP/s: ours as
separately jitted stages (``MaskRCNN.features``, ``rpn``, ``proposals``,
``box_head``, ``detect``, ``detection_masks``; FLOPs from the compiled HLO,
``experiments/flops.py``) and the host's resize and paste; torchvision's
modules called the way ``GeneralizedRCNN.forward`` calls them (FLOPs from
``torch.utils.flop_counter.FlopCounterMode``). A stage near the machine's
FLOP rate on both sides can only get faster by doing less arithmetic.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


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
    parser.add_argument(
        "--stages", action="store_true", help="also time each stage of both sides (see above)"
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
    if args.stages:
        with torch.no_grad():
            rows = stage_timings(predictor, config, image, tv, tensor, args.repeats)
        print_stages(rows)


def _ours_stages(predictor, config, image):
    """name -> (zero-argument call, conv+matmul FLOPs) for our stages, in order.

    "host resize" is the resize alone (padding into the bucket is a copy);
    torchvision's ``transform`` also normalises and batches.
    """
    from experiments.flops import hlo_flops
    from maskrcnn_jax import host_processing, xla_options
    from maskrcnn_jax.modeling import MaskRCNN
    from maskrcnn_jax.modeling.box_head import detect

    model, v, c = MaskRCNN(config), predictor.variables, config
    resized, size = predictor.preprocess(image)
    bucket = predictor.bucket_for(size)
    x = np.zeros((1, *bucket, 3), np.float32)
    x[0, : size[0], : size[1]] = resized
    x, s = jnp.asarray(x), jnp.asarray([size], jnp.int32)

    def apply(method):
        return lambda *a: model.apply(v, *a, method=method)

    fns = {
        "trunk": apply(MaskRCNN.features),
        "rpn head": apply(MaskRCNN.rpn),
        "proposals": lambda o, d, s: model.apply(v, o, d, bucket, s, method=MaskRCNN.proposals),
        "box head": apply(MaskRCNN.box_head),
        "detect": lambda cl, bd, p, pv, s: detect(
            cl, bd, p, pv, s, c.box_score_thresh, c.box_nms_thresh, c.box_min_size,
            c.detections_per_img, c.box_candidates),
        "mask head": apply(MaskRCNN.detection_masks),
    }
    stages = {"host resize": (lambda: predictor.preprocess(image), 0)}

    def compile_and_run(name, *args):
        """Compiles stage ``name`` for ``args`` (once), records it, returns its outputs."""
        compiled = xla_options.jit(fns[name]).lower(*args).compile()
        count = hlo_flops(compiled.as_text())
        stages[name] = ((lambda: jax.block_until_ready(compiled(*args))), count.conv + count.dot)
        return compiled(*args)

    # Each stage's inputs are the outputs of the stages before it.
    feats = compile_and_run("trunk", x, s)
    obj, deltas = compile_and_run("rpn head", feats)
    props, _, pvalid = compile_and_run("proposals", obj, deltas, s)
    logits, box_deltas = compile_and_run("box head", feats, props)
    boxes, scores, labels, valid = compile_and_run(
        "detect", logits, box_deltas, props, pvalid, s)
    masks = compile_and_run("mask head", feats, boxes, labels, valid)
    one = jax.device_get({"boxes": boxes[0], "scores": scores[0], "labels": labels[0],
                          "masks": masks[0], "valid": valid[0]})
    stages["host paste"] = (lambda: host_processing.postprocess_detections(
        one, size, image.shape[:2]), 0)
    return stages


def _tv_stages(tv, tensor):
    """The same for torchvision's modules, called as ``GeneralizedRCNN.forward`` calls them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from torchvision.models.detection.rpn import concat_box_prediction_layers

    images, _ = tv.transform([tensor])
    feats = tv.backbone(images.tensors)
    levels = list(feats.values())
    rpn, rh = tv.rpn, tv.roi_heads
    head_out = rpn.head(levels)

    def proposals():  # RegionProposalNetwork.forward after its head
        anchors = rpn.anchor_generator(images, levels)
        per_level = [o[0].numel() for o in head_out[0]]
        objectness, deltas = concat_box_prediction_layers(*head_out)
        boxes = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)[0]

    props = proposals()

    def box_head():
        x = rh.box_head(rh.box_roi_pool(feats, props, images.image_sizes))
        return rh.box_predictor(x)

    logits, regression = box_head()
    boxes, scores, labels = rh.postprocess_detections(
        logits, regression, props, images.image_sizes)
    detections = [{"boxes": boxes[0], "scores": scores[0], "labels": labels[0]}]
    masks = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, boxes, images.image_sizes)))
    detections[0]["masks"] = masks[torch.arange(len(labels[0])), labels[0]][:, None].sigmoid()
    calls = {
        "host resize": lambda: tv.transform([tensor]),
        "trunk": lambda: tv.backbone(images.tensors),
        "rpn head": lambda: rpn.head(levels),
        "proposals": proposals,
        "box head": box_head,
        "detect": lambda: rh.postprocess_detections(
            logits, regression, props, images.image_sizes),
        "mask head": lambda: rh.mask_predictor(
            rh.mask_head(rh.mask_roi_pool(feats, boxes, images.image_sizes))),
        "host paste": lambda: tv.transform.postprocess(
            detections, images.image_sizes, [tuple(tensor.shape[-2:])]),
    }
    stages = {}
    for name, fn in calls.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        stages[name] = (fn, counter.get_total_flops())
    return stages


def stage_timings(predictor, config, image, tv, tensor, repeats: int) -> list[dict]:
    """Per-stage medians of both sides, timed interleaved; one row per stage."""
    ours, theirs = _ours_stages(predictor, config, image), _tv_stages(tv, tensor)
    times = {(side, k): [] for side in ("ours", "tv") for k in ours}
    for _ in range(repeats):
        for k in ours:
            for side, stages in (("ours", ours), ("tv", theirs)):
                t0 = time.perf_counter()
                stages[k][0]()
                times[side, k].append(time.perf_counter() - t0)
    med = {key: float(np.median(v)) for key, v in times.items()}
    return [{"stage": k, "ours_s": med["ours", k], "tv_s": med["tv", k],
             "ours_gflop": ours[k][1] / 1e9, "tv_gflop": theirs[k][1] / 1e9} for k in ours]


def print_stages(rows: list[dict]) -> None:
    rate = lambda g, s: f"{g / s:6.0f}" if g > 0.05 and s > 0 else "     -"  # noqa: E731
    print("\nstage          ours ms  tv ms  ratio  ours GFLOP  tv GFLOP  ours GFLOP/s  tv GFLOP/s")
    for r in rows:
        ratio = r["ours_s"] / r["tv_s"] if r["tv_s"] > 0 else float("nan")
        print(f"{r['stage']:<13} {r['ours_s'] * 1e3:8.0f} {r['tv_s'] * 1e3:6.0f} {ratio:6.2f} "
              f"{r['ours_gflop']:11.1f} {r['tv_gflop']:9.1f} "
              f"{rate(r['ours_gflop'], r['ours_s']):>13} {rate(r['tv_gflop'], r['tv_s']):>11}")
    total_o, total_t = sum(r["ours_s"] for r in rows), sum(r["tv_s"] for r in rows)
    print(f"{'sum':<13} {total_o * 1e3:8.0f} {total_t * 1e3:6.0f} {total_o / total_t:6.2f}")


if __name__ == "__main__":
    main()
