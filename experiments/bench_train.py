"""Train-step benchmark on CPU: our jitted step against torchvision's train mode.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_train [--repeats 3] [--instances 8]
  .venv/bin/python -m experiments.bench_train --recipe shapes [--width 64]

``--recipe r50`` (default): both models start from the same random weights (torchvision's
``maskrcnn_resnet50_fpn`` initialisation, converted), batch 2, two 800x1067
images (padded to 800x1088 by both) with the same ground-truth instances.

- ours: one ``jax.jit`` train step (RPN + RoI sampling, the five losses,
  backward, SGD with momentum and weight decay), float32, state donated;
- torchvision: ``model(images, targets)`` in train mode, ``backward()`` and
  ``torch.optim.SGD.step()``.

``--recipe shapes``: the ``make train`` recipe (``experiments/shapes.py``:
GroupNorm ResNet-18, FPN 64 with GroupNorm, fc 256, mask head 64 with
GroupNorm, anchors 16-256, batch 8 at 128x128, 1000/256 proposals, 128
anchors and 128 RoIs sampled per image, SGD with momentum) against a
torchvision ``MaskRCNN`` built to match it (issue 15). torchvision's ResNet-18
has width 64 only, so ours runs at ``--width`` (default 64; the recipe's own
is 32). Random initialisation on both sides; eight images of three squares
each.

Each side runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own. Reported: compile time (ours), steady-state median
seconds per step, their ratio, peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HEIGHT, WIDTH, PADDED = 800, 1067, (800, 1088)


def _scene(num_instances: int, seed: int = 0):
    """Two images with ellipse instances: images, full masks, boxes, labels."""
    rng = np.random.default_rng(seed)
    images, masks, boxes, labels = [], [], [], []
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for _ in range(2):
        img = rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
        m, b = [], []
        for _ in range(num_instances):
            cy, cx = rng.uniform(100, HEIGHT - 100), rng.uniform(100, WIDTH - 100)
            ry, rx = rng.uniform(20, 90), rng.uniform(20, 90)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            ys, xs = np.nonzero(mask)
            m.append(mask.astype(np.uint8))
            b.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(img)
        masks.append(np.stack(m))
        boxes.append(np.asarray(b, np.float32))
        labels.append(rng.integers(1, 91, size=num_instances).astype(np.int64))
    return images, masks, boxes, labels


def _torch_model():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)


def run_ours(repeats: int, num_instances: int, mask_rois: int = 0) -> dict:
    import jax

    from experiments.coco_r50_fpn_1x import get_config
    from maskrcnn_jax import ops, torchvision_weights, train
    from maskrcnn_jax.modeling import MaskRCNN
    from maskrcnn_jax.optim import make_optimizer

    sd = {k: v.numpy() for k, v in _torch_model().state_dict().items()}
    config = get_config()
    config.model = torchvision_weights.config_from_state_dict(sd, dtype="float32", roi_align_impl="reference")
    variables = torchvision_weights.convert_torchvision_state_dict(sd, config.model)
    config.train.batch_size = 2
    config.model.mask_rois_per_image = mask_rois

    images, masks, boxes, labels = _scene(num_instances)
    image = np.zeros((2, *PADDED, 3), np.uint8)
    image[:, :HEIGHT, :WIDTH] = np.stack(images)
    crop = 56
    crops = [
        ops.roi_align(m[..., None].astype(np.float32), b[:, None], crop, 1.0, 2, aligned=True)[:, 0, ..., 0]
        for m, b in zip(masks, boxes)
    ]
    batch = {
        "image": image,
        "image_size": np.array([[HEIGHT, WIDTH]] * 2, np.int32),
        "boxes": np.stack(boxes),
        "labels": np.stack(labels).astype(np.int32),
        "masks": (np.stack([np.asarray(c) for c in crops]) >= 0.5).astype(np.uint8),
        "is_crowd": np.zeros((2, num_instances), bool),
        "valid": np.ones((2, num_instances), bool),
    }
    optimizer = make_optimizer(config, variables["params"])
    state = train.create_train_state(variables, optimizer, jax.random.key(0))
    step = jax.jit(train.make_train_step(MaskRCNN(config.model), config, optimizer), donate_argnums=(0,))
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(np.median(times)), "compile_s": compile_s, "loss": float(metrics["loss"]),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_torchvision(repeats: int, num_instances: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, masks, boxes, labels = _scene(num_instances)
    timgs = [torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images]
    targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(l), "masks": torch.from_numpy(m)}
        for b, l, m in zip(boxes, labels, masks)
    ]

    def step():
        losses = model(timgs, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(np.median(times)), "loss": loss,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


SHAPES_B, SHAPES_HW, SHAPES_INSTANCES = 8, 128, 3


def _shapes_scene(seed: int = 0):
    """Eight 128x128 images of three filled squares: images, full masks, boxes, labels."""
    rng = np.random.default_rng(seed)
    images, masks, boxes, labels = [], [], [], []
    for _ in range(SHAPES_B):
        img = rng.integers(0, 255, size=(SHAPES_HW, SHAPES_HW, 3), dtype=np.uint8)
        m, b = [], []
        for _ in range(SHAPES_INSTANCES):
            s = int(rng.integers(16, 48))
            x0, y0 = (int(v) for v in rng.integers(0, SHAPES_HW - s, 2))
            mask = np.zeros((SHAPES_HW, SHAPES_HW), np.uint8)
            mask[y0 : y0 + s, x0 : x0 + s] = 1
            m.append(mask)
            b.append([x0, y0, x0 + s, y0 + s])
        images.append(img)
        masks.append(np.stack(m))
        boxes.append(np.asarray(b, np.float32))
        labels.append(rng.integers(1, 4, size=SHAPES_INSTANCES).astype(np.int64))
    return images, masks, boxes, labels


def run_ours_shapes(repeats: int, width: int) -> dict:
    import jax

    from experiments.shapes import get_config
    from maskrcnn_jax import ops, optim, train
    from maskrcnn_jax.modeling import MaskRCNN, init_model

    config = get_config()
    config.model.backbone_width = width
    images, masks, boxes, labels = _shapes_scene()
    m, crop = config.dataset.max_instances, config.dataset.mask_size
    n = SHAPES_INSTANCES
    pad = lambda a: np.concatenate([a, np.zeros((m - n, *a.shape[1:]), a.dtype)])
    crops = [
        np.asarray(ops.roi_align(mk[..., None].astype(np.float32), b[:, None], crop, 1.0, 2,
                                 aligned=True))[:, 0, ..., 0]
        for mk, b in zip(masks, boxes)
    ]
    batch = {
        "image": np.stack(images),
        "image_size": np.full((SHAPES_B, 2), SHAPES_HW, np.int32),
        "boxes": np.stack([pad(b) for b in boxes]),
        "labels": np.stack([pad(lab.astype(np.int32)) for lab in labels]),
        "masks": np.stack([pad((c >= 0.5).astype(np.uint8)) for c in crops]),
        "is_crowd": np.zeros((SHAPES_B, m), bool),
        "valid": np.arange(m)[None].repeat(SHAPES_B, 0) < n,
    }
    variables = init_model(config.model, jax.random.key(0), (SHAPES_HW, SHAPES_HW))
    optimizer = optim.make_optimizer(config, variables["params"])
    # Jitted as in train.py: distinct buffers for the donated state's zero counters.
    init_state = lambda v, k: train.create_train_state(v, optimizer, k)
    state = jax.jit(init_state)(variables, jax.random.key(0))
    step = jax.jit(
        train.make_train_step(MaskRCNN(config.model), config, optimizer),
        donate_argnums=(0,),
    )
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(np.min(times)), "compile_s": compile_s, "loss": float(metrics["loss"]),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _torch_shapes_model():
    import torch
    from torch import nn
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(0)
    gn = lambda c: nn.GroupNorm(32, c)
    body = resnet18(weights=None, norm_layer=gn)
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512], 64, extra_blocks=LastLevelMaxPool(), norm_layer=gn,
    )
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(
        backbone, num_classes=None, min_size=128, max_size=128,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=256,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=200,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, box_detections_per_img=50,
        box_head=TwoMLPHead(64 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, 4),
        mask_head=MaskRCNNHeads(64, [64] * 4, 1, norm_layer=gn),
        mask_predictor=MaskRCNNPredictor(64, 64, 4),
    )


def run_torchvision_shapes(repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_shapes_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images, masks, boxes, labels = _shapes_scene()
    timgs = [torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images]
    targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c), "masks": torch.from_numpy(m)}
        for b, c, m in zip(boxes, labels, masks)
    ]

    def step():
        losses = model(timgs, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(np.min(times)), "loss": loss,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--mask-rois", type=int, default=0, help="model.mask_rois_per_image (0 = 128)")
    parser.add_argument("--recipe", choices=["r50", "shapes"], default="r50")
    parser.add_argument("--width", type=int, default=64, help="shapes: our backbone_width")
    parser.add_argument("--only", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only and args.recipe == "shapes":
        if args.only == "ours":
            result = run_ours_shapes(args.repeats, args.width)
        else:
            result = run_torchvision_shapes(args.repeats)
        print(json.dumps(result))
        return
    if args.only:
        if args.only == "ours":
            result = run_ours(args.repeats, args.instances, args.mask_rois)
        else:
            result = run_torchvision(args.repeats, args.instances)
        print(json.dumps(result))
        return
    results = {}
    for which in ("ours", "torchvision"):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.bench_train", "--only", which,
             "--repeats", str(args.repeats), "--instances", str(args.instances),
             "--mask-rois", str(args.mask_rois), "--recipe", args.recipe,
             "--width", str(args.width)],
            check=True, capture_output=True, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, tv = results["ours"], results["torchvision"]
    if args.recipe == "shapes":
        print(
            f"cpu cores={os.cpu_count()} recipe=shapes batch={SHAPES_B}"
            f" images={SHAPES_HW}x{SHAPES_HW}"
            f" width ours={args.width} torchvision=64; min s/step of {args.repeats}"
        )
    else:
        print(
        f"cpu cores={os.cpu_count()} batch=2 images={HEIGHT}x{WIDTH} instances={args.instances}"
        f" mask_rois_per_image={args.mask_rois or 128}"
    )
    print(f"{'':12} {'s/step':>8} {'compile s':>10} {'peak MB':>8}")
    print(f"{'ours':12} {ours['step_s']:8.2f} {ours['compile_s']:10.1f} {ours['peak_mb']:8.0f}")
    print(f"{'torchvision':12} {tv['step_s']:8.2f} {'':>10} {tv['peak_mb']:8.0f}")
    print(f"ratio ours/torchvision: {ours['step_s'] / tv['step_s']:.2f}")


if __name__ == "__main__":
    main()
