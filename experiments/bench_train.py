"""Train-step benchmark on CPU: our jitted step against torchvision's train mode.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_train [--repeats 3] [--instances 8]
  .venv/bin/python -m experiments.bench_train --recipe shapes [--width 64]
  .venv/bin/python -m experiments.bench_train --flops [--instances 8] [--mask-rois 0]

``--recipe r50`` (default): both models start from the same random weights (torchvision's
``maskrcnn_resnet50_fpn`` initialisation, converted), batch 2, two 800x1067
images (padded to 800x1088 by both) with the same ground-truth instances.

- ours: one ``jax.jit`` train step (RPN + RoI sampling, the five losses,
  backward, SGD with momentum and weight decay), float32, state donated;
- torchvision: ``model(images, targets)`` in train mode, ``backward()`` and
  ``torch.optim.SGD.step()``.

``--recipe shapes``: the ``make train`` recipe (``experiments/shapes.py``:
GroupNorm ResNet-18, FPN 64 with GroupNorm, fc 256, mask head 32 with
GroupNorm, anchors 16-256, batch 8 at 128x128, 1000/256 proposals, 128
anchors and 128 RoIs sampled per image, SGD with momentum) against a
torchvision ``MaskRCNN`` built from the same config to match it (issue 15).
torchvision's ResNet-18 has width 64 only, so ours runs at ``--width``
(default 64; the recipe's own is 32). Random initialisation on both sides,
then ``--warmup`` untimed steps; eight images of three squares each.

Each side runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own. Reported: compile time (ours), steady-state median
seconds per step, their ratio, peak memory.

``--flops``: convolution and matmul FLOPs per image of one R50-FPN train step
(forward + backward; platform-independent arithmetic, nothing is timed) on
COCO-like sources, a 480x640 landscape and a 640x480 portrait, resized at
800/1333 (800x1067 / 1067x800), 8 instances each, batches of 2:

- ours: the ``coco_r50_fpn_1x`` step (float32, ``reference`` RoIAlign),
  compiled (never run) and counted from its HLO (``experiments/flops.py``),
  before (one 1344x1344 canvas) and after (the aspect canvases 800x1344 /
  1344x800, a batch of each orientation);
- torchvision: ``maskrcnn_resnet50_fpn`` (81 classes, stem and layer1 frozen
  as the recipe's ``freeze_at=2``) under ``torch.utils.flop_counter.
  FlopCounterMode``, a batch of each orientation (800x1088 / 1088x800 after
  its padding to 32), as its aspect-ratio grouping would form them.
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


def _ellipse_scene(
    size: tuple[int, int], num_instances: int, seed: int, *, count: int, margin: float,
    radii: tuple[float, float], num_classes: int,
):  # fmt: skip
    """``count`` random HxW uint8 images with ellipse instances whose centres keep
    ``margin`` pixels from the border: images, full masks, boxes, labels 1..num_classes-1."""
    height, width = size
    rng = np.random.default_rng(seed)
    images, masks, boxes, labels = [], [], [], []
    yy, xx = np.mgrid[:height, :width]
    for _ in range(count):
        images.append(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))
        m, b = [], []
        for _ in range(num_instances):
            cy, cx = rng.uniform(margin, height - margin), rng.uniform(margin, width - margin)
            ry, rx = rng.uniform(*radii), rng.uniform(*radii)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            ys, xs = np.nonzero(mask)
            m.append(mask.astype(np.uint8))
            b.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(np.stack(m))
        boxes.append(np.asarray(b, np.float32))
        labels.append(rng.integers(1, num_classes, size=num_instances).astype(np.int64))
    return images, masks, boxes, labels


def _scene(num_instances: int, seed: int = 0):
    """Two 800x1067 images with ellipse instances: images, full masks, boxes, labels."""
    return _ellipse_scene((HEIGHT, WIDTH), num_instances, seed, count=2, margin=100,
                          radii=(20, 90), num_classes=91)  # fmt: skip


def _time_jax_step(step, state, batch, repeats: int, stat, warmup: int = 1):
    """Compiles the jitted ``step`` for ``batch``, runs ``warmup`` untimed steps (at
    least one), then ``stat`` of ``repeats``. Returns (result, the final state)."""
    import jax

    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(max(warmup, 1)):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(stat(times)), "compile_s": compile_s, "loss": float(metrics["loss"]),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, state


def _torch_inputs(images, masks, boxes, labels):
    """A scene (HxWx3 uint8 images, full masks, boxes, labels) as torchvision's train inputs."""
    import torch

    timgs = [torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images]
    targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c), "masks": torch.from_numpy(m)}
        for b, c, m in zip(boxes, labels, masks)
    ]
    return timgs, targets


def _time_torch_step(model, opt, timgs, targets, repeats: int, stat, warmup: int = 1) -> dict:
    """``warmup`` untimed SGD steps (at least one) of torchvision's train mode, then
    ``stat`` of ``repeats`` steps."""

    def step():
        loss = sum(model(timgs, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    for _ in range(max(warmup, 1)):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": float(stat(times)), "loss": loss,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _count_positives(model) -> list[list[int]]:
    """Wraps ``model.roi_heads.select_training_samples`` to record, per call, the
    number of positive RoIs of each image: what torchvision's mask head runs on."""
    positives: list[list[int]] = []
    sample = model.roi_heads.select_training_samples

    def counting_sample(proposals, targets):
        out = sample(proposals, targets)
        positives.append([int((lab > 0).sum()) for lab in out[2]])
        return out

    model.roi_heads.select_training_samples = counting_sample
    return positives


def _timed_positives(positives: list[list[int]], warmup: int) -> float:
    """Mean positives per image over the calls after the warm-up (at least one
    untimed call precedes the timed steps, see ``_time_torch_step``)."""
    return float(np.mean([np.mean(p) for p in positives[max(warmup, 1) :]]))


def _torch_model():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)


def mask_positives(model, variables, batch, key) -> np.ndarray:
    """[B] int: the mask head's positive RoIs of each image of ``batch`` (one forward
    of the losses, sampling with ``key``)."""
    import jax

    from maskrcnn_jax.modeling import MaskRCNN

    _, inter = jax.jit(lambda v, b: model.apply(
        v, b["image"], b["image_size"], b, key, method=MaskRCNN.losses, mutable=["intermediates"]
    ))(variables, batch)  # fmt: skip
    return np.asarray(inter["intermediates"]["mask_positive"][0]).sum(axis=1)


def _mask_head_rois(model, variables, batch, key) -> tuple[int, float]:
    """The mask head's slots per image on ``batch``, the static prefix that
    ``mask_head_prefixes`` picks for its positives (all slots when it is 1), and
    the mean positives per image."""
    from maskrcnn_jax.modeling.config import mask_head_prefix_sizes, mask_slots_per_image

    c = model.config
    per_image = mask_positives(model, variables, batch, key)
    sizes = mask_head_prefix_sizes(mask_slots_per_image(c), c.mask_head_prefixes)
    return next(n for n in sizes if n >= int(per_image.max())), float(per_image.mean())


def _time_ours(config, variables, batch, repeats: int, stat, warmup: int = 1) -> dict:
    """Our jitted, donated train step on ``batch`` (``_time_jax_step``), with the mask
    head's slots and positives on that batch after the timed steps (``_mask_head_rois``)
    and its static slots."""
    import jax

    from maskrcnn_jax import host_allocator, optim, train, xla_options
    from maskrcnn_jax.modeling import MaskRCNN
    from maskrcnn_jax.modeling.config import mask_slots_per_image

    host_allocator.keep_freed_blocks()  # as the training CLI does on the CPU
    optimizer = optim.make_optimizer(config, variables["params"])
    # Jitted as in train.py: distinct buffers for the donated state's zero counters.
    init_state = lambda v, k: train.create_train_state(v, optimizer, k)
    state = jax.jit(init_state)(variables, jax.random.key(0))
    model = MaskRCNN(config.model)
    step = xla_options.jit(train.make_train_step(model, config, optimizer), donate_argnums=(0,))
    result, state = _time_jax_step(step, state, batch, repeats, stat, warmup)
    rois, positives = _mask_head_rois(model, state.variables(), batch, jax.random.key(1))
    return {**result, "mask_rois": rois, "positives": positives,
            "mask_slots": mask_slots_per_image(config.model)}  # fmt: skip


def run_ours(
    repeats: int, num_instances: int, mask_rois: int = 0, prefixes: int = 0, warmup: int = 1
) -> dict:
    from experiments.coco_r50_fpn_1x import get_config
    from maskrcnn_jax import ops, torchvision_weights

    sd = {k: v.numpy() for k, v in _torch_model().state_dict().items()}
    config = get_config()
    config.model = torchvision_weights.config_from_state_dict(sd, dtype="float32", roi_align_impl="reference")
    variables = torchvision_weights.convert_torchvision_state_dict(sd, config.model)
    config.train.batch_size = 2
    config.model.mask_rois_per_image = mask_rois
    if prefixes:
        config.model.mask_head_prefixes = prefixes

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
    return _time_ours(config, variables, batch, repeats, np.median, warmup)


def run_torchvision(repeats: int, num_instances: int, warmup: int = 1) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_model().train()
    positives = _count_positives(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    inputs = _torch_inputs(*_scene(num_instances))
    result = _time_torch_step(model, opt, *inputs, repeats, np.median, warmup)
    return {**result, "mask_rois": _timed_positives(positives, warmup)}


SHAPES_B, SHAPES_HW, SHAPES_INSTANCES = 8, 128, 3


def _shapes_scene(seed: int = 0):
    """Eight 128x128 noise images, each with three squares filled with their class's
    grey level (so the model can learn them): images, full masks, boxes, labels."""
    rng = np.random.default_rng(seed)
    images, masks, boxes, labels = [], [], [], []
    for _ in range(SHAPES_B):
        img = rng.integers(0, 255, size=(SHAPES_HW, SHAPES_HW, 3), dtype=np.uint8)
        m, b = [], []
        lab = rng.integers(1, 4, size=SHAPES_INSTANCES).astype(np.int64)
        for c in lab:
            s = int(rng.integers(16, 48))
            x0, y0 = (int(v) for v in rng.integers(0, SHAPES_HW - s, 2))
            mask = np.zeros((SHAPES_HW, SHAPES_HW), np.uint8)
            mask[y0 : y0 + s, x0 : x0 + s] = 1
            img[y0 : y0 + s, x0 : x0 + s] = 64 * c
            m.append(mask)
            b.append([x0, y0, x0 + s, y0 + s])
        # Later squares cover earlier ones: each mask keeps the pixels still its own.
        for i in range(len(m) - 1):
            m[i] = m[i] * (1 - np.max(m[i + 1 :], axis=0))
        images.append(img)
        masks.append(np.stack(m))
        boxes.append(np.asarray(b, np.float32))
        labels.append(lab)
    return images, masks, boxes, labels


def run_ours_shapes(
    repeats: int, width: int, mask_rois: int = 0, prefixes: int = 0, warmup: int = 1
) -> dict:
    import jax

    from experiments.shapes import get_config
    from maskrcnn_jax import ops
    from maskrcnn_jax.modeling import init_model

    config = get_config()
    config.model.backbone_width = width
    config.train.warmup_steps = 0  # base_lr from the first step, as torchvision's side
    if mask_rois:
        config.model.mask_rois_per_image = mask_rois
    if prefixes:
        config.model.mask_head_prefixes = prefixes
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
    return _time_ours(config, variables, batch, repeats, np.min, warmup)


def _torch_shapes_model():
    """torchvision's ``MaskRCNN`` built to match ``experiments/shapes.py``'s model.

    Read from our config: anchors, proposal counts, sampling, detections, the
    FPN, fc and mask-head widths and the class count. Fixed by torchvision:
    its ResNet-18 at width 64 (ours runs at ``--width``).
    """
    import torch
    from torch import nn
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from experiments.shapes import get_config

    m = get_config().model
    torch.manual_seed(0)
    gn = lambda c: nn.GroupNorm(32, c)
    body = resnet18(weights=None, norm_layer=gn)
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512], m.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=gn,
    )
    anchors = AnchorGenerator(tuple((s,) for s in m.anchor_sizes),
                              (tuple(m.aspect_ratios),) * len(m.anchor_sizes))  # fmt: skip
    return MaskRCNN(
        backbone, num_classes=None, min_size=m.min_size, max_size=m.max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_batch_size_per_image=m.roi_batch_size_per_image,
        box_detections_per_img=m.detections_per_img,
        box_head=TwoMLPHead(m.fpn_channels * m.box_roi_size**2, m.representation_size),
        box_predictor=FastRCNNPredictor(m.representation_size, m.num_classes),
        mask_head=MaskRCNNHeads(m.fpn_channels, [m.mask_head_dim] * 4, 1, norm_layer=gn),
        mask_predictor=MaskRCNNPredictor(m.mask_head_dim, m.mask_head_dim, m.num_classes),
    )


def run_torchvision_shapes(repeats: int, warmup: int = 1) -> dict:
    import torch

    from experiments.shapes import get_config

    torch.set_num_threads(os.cpu_count() or 1)
    model = _torch_shapes_model().train()
    positives = _count_positives(model)
    lr = get_config().train.base_lr  # ours: the same, with no LR warm-up in this bench
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    inputs = _torch_inputs(*_shapes_scene())
    result = _time_torch_step(model, opt, *inputs, repeats, np.min, warmup)
    return {**result, "mask_rois": _timed_positives(positives, warmup)}


FLOPS_SOURCES = {"landscape": (480, 640), "portrait": (640, 480)}  # (h, w), COCO-like
FLOPS_BATCH = 2


def _scene_at(size: tuple[int, int], num_instances: int, seed: int):
    """FLOPS_BATCH images of ``size`` (h, w) with ellipse instances, as ``_scene``."""
    return _ellipse_scene(size, num_instances, seed, count=FLOPS_BATCH, margin=60,
                          radii=(12, 55), num_classes=81)  # fmt: skip


def _flops_config(mask_rois: int):
    from experiments.coco_r50_fpn_1x import get_config

    config = get_config()
    config.model.dtype = "float32"
    config.model.roi_align_impl = "reference"
    config.model.mask_rois_per_image = mask_rois
    config.train.batch_size = FLOPS_BATCH
    return config


def run_ours_flops(num_instances: int, mask_rois: int) -> dict:
    """Conv + matmul FLOPs of our train step per canvas (compiled, not run)."""
    import jax

    from experiments.flops import hlo_flops
    from maskrcnn_jax import batch as batch_lib
    from maskrcnn_jax import optim, train
    from maskrcnn_jax.data import transforms
    from maskrcnn_jax.modeling import MaskRCNN, init_model
    from maskrcnn_jax.modeling.config import mask_head_prefix_sizes, mask_slots_per_image

    config = _flops_config(mask_rois)
    sizes = mask_head_prefix_sizes(mask_slots_per_image(config.model),
                                   config.model.mask_head_prefixes)  # fmt: skip
    ds = config.dataset
    spec = transforms.InputSpec.from_config(ds)
    variables = jax.eval_shape(lambda k: init_model(config.model, k), jax.random.key(0))
    optimizer = optim.make_optimizer(config, variables["params"])
    state = jax.eval_shape(
        lambda v, k: train.create_train_state(v, optimizer, k), variables, jax.random.key(0)
    )
    step = jax.jit(train.make_train_step(MaskRCNN(config.model), config, optimizer))
    n = min(num_instances, int(ds.max_instances))
    canvases = {"square": tuple(ds.image_size)}
    canvases.update(zip(("landscape", "portrait"), (tuple(c) for c in ds.aspect_canvases)))
    result = {}
    for name, canvas in canvases.items():
        b = batch_lib.zeros_batch(FLOPS_BATCH, canvas, ds.max_instances, ds.mask_size,
                                  ds.image_dtype, keys=batch_lib.TRAIN_KEYS)  # fmt: skip
        source = FLOPS_SOURCES["portrait" if name == "portrait" else "landscape"]
        geom = transforms.sample_geometry(*source, spec, train=False, rng=None)
        b["image_size"][:] = (geom.out_h, geom.out_w)
        b["boxes"][:, :n] = [8.0, 8.0, 120.0, 100.0]
        b["labels"][:, :n], b["valid"][:, :n] = 1, True
        t0 = time.perf_counter()
        text = step.lower(state, b).compile().as_text()
        compile_s = time.perf_counter() - t0
        count = hlo_flops(text)  # the mask head on all its slots
        # The mask head's switch (mask_head_prefixes) has one branch per prefix size:
        # the FLOPs of the step when it takes each (other conditionals: the costliest).
        by_prefix = []  # aligned with sizes
        for i in range(len(sizes)):
            pick = lambda costs, i=i: i if len(costs) == len(sizes) else costs.index(max(costs))
            c = hlo_flops(text, branch=pick)
            by_prefix.append({"conv": c.conv, "dot": c.dot})
        result[name] = {
            "canvas": canvas, "image": (geom.out_h, geom.out_w), "conv": count.conv,
            "dot": count.dot, "unknown_loop_flops": sum(count.unknown_trip_counts.values()),
            "uncounted_custom_calls": count.uncounted_custom_calls,
            "compile_s": compile_s, "by_prefix": by_prefix,
        }  # fmt: skip
    result["mask_rois"] = mask_slots_per_image(config.model)
    result["prefix_sizes"] = sizes
    return result


def run_torchvision_flops(num_instances: int) -> dict:
    """Conv + matmul FLOPs of torchvision's train step, one batch per orientation."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81
    ).train()
    for name, p in model.backbone.body.named_parameters():  # trainable_backbone_layers=3
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    positives = _count_positives(model)
    batch_shape = []
    batch_images = model.transform.batch_images

    def recording_batch_images(imgs, size_divisible=32):
        out = batch_images(imgs, size_divisible)
        batch_shape.append(tuple(out.shape[-2:]))
        return out

    model.transform.batch_images = recording_batch_images
    result = {}
    for seed, (name, size) in enumerate(FLOPS_SOURCES.items()):
        timgs, targets = _torch_inputs(*_scene_at(size, num_instances, seed))
        with FlopCounterMode(display=False) as counter:
            sum(model(timgs, targets).values()).backward()
        model.zero_grad(set_to_none=True)
        by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        conv = sum(v for k, v in by_op.items() if "convolution" in k)
        result[name] = {"canvas": batch_shape[-1], "conv": conv,
                        "dot": counter.get_total_flops() - conv,
                        "positives": positives[-1]}
    return result


def _print_flops(ours: dict, tv: dict, num_instances: int) -> None:
    per = lambda r: (r["conv"] + r["dot"]) / FLOPS_BATCH / 1e9  # GFLOP per image
    tv_img = sum(per(tv[k]) for k in FLOPS_SOURCES) / 2
    print(
        f"conv + matmul FLOPs per image, train step (forward + backward), batch {FLOPS_BATCH}, "
        f"{num_instances} instances, sources 480x640 / 640x480 at 800/1333; "
        f"mask head RoIs per image: ours {ours['mask_rois']} (static), torchvision "
        + " / ".join(",".join(map(str, tv[k]["positives"])) for k in FLOPS_SOURCES)
        + " (its positives per image)"
    )
    print(f"{'':44} {'conv GF':>8} {'matmul GF':>9} {'total GF':>9} {'vs tv':>6}")

    def row(label, results):
        conv = sum(r["conv"] for r in results) / len(results) / FLOPS_BATCH / 1e9
        dot = sum(r["dot"] for r in results) / len(results) / FLOPS_BATCH / 1e9
        print(f"{label:44} {conv:8.1f} {dot:9.1f} {conv + dot:9.1f} {(conv + dot) / tv_img:6.2f}")

    for k in FLOPS_SOURCES:
        row(f"torchvision, {k} ({'x'.join(map(str, tv[k]['canvas']))})", [tv[k]])
    row("torchvision, mean", [tv[k] for k in FLOPS_SOURCES])
    row("ours before: one 1344x1344 canvas", [ours["square"]])
    for k in FLOPS_SOURCES:
        row(f"ours after: {k} ({'x'.join(map(str, ours[k]['canvas']))})", [ours[k]])
    row("ours after: mean", [ours[k] for k in FLOPS_SOURCES])
    print(f"after / before (ours): {per(ours['landscape']) / per(ours['square']):.3f}")
    # The mask head on the shortest prefix that holds every image's positives
    # (mask_head_prefixes), at torchvision's positives on each orientation's batch.
    sizes = ours["prefix_sizes"]
    at = lambda k, size: ours[k]["by_prefix"][sizes.index(size)]
    taken = {k: next(n for n in sizes if n >= max(tv[k]["positives"])) for k in FLOPS_SOURCES}
    for k in FLOPS_SOURCES:
        row(f"ours, mask head on {taken[k]} slots: {k}", [at(k, taken[k])])
    row("ours, mask head on that prefix: mean", [at(k, taken[k]) for k in FLOPS_SOURCES])
    for size in sizes:
        row(f"ours, mask head on {size} slots: mean", [at(k, size) for k in FLOPS_SOURCES])
    loops = max(ours[k]["unknown_loop_flops"] for k in ("square", *FLOPS_SOURCES))
    customs = [c for k in ("square", *FLOPS_SOURCES) for c in ours[k]["uncounted_custom_calls"]]
    if loops or customs:
        print(f"warning: loops of data-dependent length counted once ({loops / 1e9:.3f} GF per "
              f"iteration); uncounted custom calls: {customs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--mask-rois", type=int, default=0,
                        help="model.mask_rois_per_image (0: r50 all 128, shapes its config's)")
    parser.add_argument("--mask-prefixes", type=int, default=0,
                        help="model.mask_head_prefixes (0: the config's; 1: every slot always)")
    parser.add_argument("--recipe", choices=["r50", "shapes"], default="r50")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of both sides, one after the other; the table shows the "
                             "round of the median ratio")
    parser.add_argument("--width", type=int, default=64, help="shapes: our backbone_width")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps on the batch before timing (default: r50 1, shapes "
                             "30, so that both RPNs learn the scene and the mask heads run on "
                             "the positives of a model in training, not at initialisation)")
    parser.add_argument("--flops", action="store_true",
                        help="count conv + matmul FLOPs per image instead of timing")
    parser.add_argument("--only", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.flops:
        if args.only:
            run = run_ours_flops if args.only == "ours" else run_torchvision_flops
            extra = (args.mask_rois,) if args.only == "ours" else ()
            print(json.dumps(run(args.instances, *extra)))
            return
        results = {}
        for which in ("torchvision", "ours"):
            out = subprocess.run(
                [sys.executable, "-m", "experiments.bench_train", "--flops", "--only", which,
                 "--instances", str(args.instances), "--mask-rois", str(args.mask_rois)],
                capture_output=True, text=True, check=False,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )  # fmt: skip
            if out.returncode:
                sys.exit(f"bench_train --flops --only {which} failed:\n{out.stderr[-3000:]}")
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        _print_flops(results["ours"], results["torchvision"], args.instances)
        print(json.dumps(results))
        return
    if args.warmup is None:
        args.warmup = 30 if args.recipe == "shapes" else 1
    if args.only and args.recipe == "shapes":
        if args.only == "ours":
            result = run_ours_shapes(args.repeats, args.width, args.mask_rois, args.mask_prefixes,
                                     args.warmup)  # fmt: skip
        else:
            result = run_torchvision_shapes(args.repeats, args.warmup)
        print(json.dumps(result))
        return
    if args.only:
        if args.only == "ours":
            result = run_ours(args.repeats, args.instances, args.mask_rois, args.mask_prefixes,
                              args.warmup)  # fmt: skip
        else:
            result = run_torchvision(args.repeats, args.instances, args.warmup)
        print(json.dumps(result))
        return
    # Each round runs both sides, one after the other; with several rounds, the machine's
    # drift between the two subprocesses (minutes apart) shows in the rounds' spread.
    rounds = []
    for r in range(args.rounds):
        results = {}
        for which in ("ours", "torchvision"):
            out = subprocess.run(
                [sys.executable, "-m", "experiments.bench_train", "--only", which,
                 "--repeats", str(args.repeats), "--instances", str(args.instances),
                 "--mask-rois", str(args.mask_rois), "--recipe", args.recipe,
                 "--width", str(args.width), "--mask-prefixes", str(args.mask_prefixes),
                 "--warmup", str(args.warmup)],
                check=True, capture_output=True, text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        results["ratio"] = results["ours"]["step_s"] / results["torchvision"]["step_s"]
        rounds.append(results)
        if args.rounds > 1:
            print(f"round {r + 1}: ours {results['ours']['step_s']:.2f} s, torchvision"
                  f" {results['torchvision']['step_s']:.2f} s, ratio {results['ratio']:.2f}",
                  flush=True)  # fmt: skip
    # The table shows the round of the median ratio (the lower middle one of an even count).
    middle = sorted(rounds, key=lambda res: res["ratio"])[(len(rounds) - 1) // 2]
    ours, tv = middle["ours"], middle["torchvision"]
    if args.rounds > 1:
        print(f"median ratio of {args.rounds} rounds: {middle['ratio']:.2f} (the round below)")
    if args.recipe == "shapes":
        print(
            f"cpu cores={os.cpu_count()} recipe=shapes batch={SHAPES_B}"
            f" images={SHAPES_HW}x{SHAPES_HW}"
            f" width ours={args.width} torchvision=64; min s/step of {args.repeats}"
            f" after {args.warmup} untimed steps"
        )
    else:
        print(
        f"cpu cores={os.cpu_count()} batch=2 images={HEIGHT}x{WIDTH} instances={args.instances}"
        f" mask_rois_per_image={args.mask_rois or 128}; median s/step of {args.repeats}"
        f" after {args.warmup} untimed steps"
    )
    print(f"{'':12} {'s/step':>8} {'compile s':>10} {'peak MB':>8}")
    print(f"{'ours':12} {ours['step_s']:8.2f} {ours['compile_s']:10.1f} {ours['peak_mb']:8.0f}")
    print(f"{'torchvision':12} {tv['step_s']:8.2f} {'':>10} {tv['peak_mb']:8.0f}")
    print(f"ratio ours/torchvision: {ours['step_s'] / tv['step_s']:.2f}")
    print(
        f"mask head RoIs per image: ours {ours['mask_rois']} of {ours['mask_slots']} static slots"
        f" (the prefix its {ours['positives']:.1f} positives per image take after the timed"
        f" steps), torchvision {tv['mask_rois']:.1f} (its positives, mean of the timed steps;"
        " they grow as its RPN learns)"
    )


if __name__ == "__main__":
    main()
