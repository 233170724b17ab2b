"""End-to-end parity with torchvision's ``maskrcnn_resnet50_fpn`` (the one full-size test).

Both models get the same random weights (every parameter and batch-norm
buffer drawn with a fixed seed, scaled so activations stay O(1), class logits
biased so that there are detections) and the same two images: a synthetic
photograph-like 480x704 image (downscaled) and an odd 203x297 one
(upscaled). min_size/max_size are 320/512 for speed; both images resize into a
320x480 padded batch, so one compilation serves both.

Compared: FPN outputs, RPN proposals, final detections (both ways) and pasted
masks. Run ``python tests/test_parity.py`` to print the measured figures.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax.torchvision_weights import (
    config_from_state_dict,
    convert_torchvision_state_dict,
)
from maskrcnn_jax.inference import Predictor, resize_image, resized_size
from maskrcnn_jax.modeling import MaskRCNN
from maskrcnn_jax.ops import box_iou

MIN_SIZE, MAX_SIZE = 320, 512
IMAGE_SHAPES = ((480, 704), (203, 297))


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients, a few filled shapes and sensor-like noise, uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    img = np.stack(
        [
            110 + 70 * np.sin(2 * np.pi * (0.7 * x + 0.3 * y) + c) + 30 * (y - 0.5)
            for c in (0.0, 1.3, 2.6)
        ],
        axis=-1,
    )
    for _ in range(8):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.05, 0.25, 2)
        color = rng.uniform(0, 255, 3)
        if rng.uniform() < 0.5:
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        else:
            inside = (np.abs(y - cy) < ry) & (np.abs(x - cx) < rx)
        shade = 1 + 0.3 * (y - cy) / ry  # shaded like a lit object
        img = np.where(inside[..., None], color * shade[..., None], img)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def randomize_torchvision(model, seed: int = 0) -> None:
    """Draws every parameter and BN buffer; activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                gain = math.sqrt(2.0)
                if name.endswith(("cls_logits", "bbox_pred", "cls_score", "mask_fcn_logits")):
                    gain = 1.0
                normal(module.weight, gain / math.sqrt(fan_in))
                if module.bias is not None:
                    normal(module.bias, 0.05)
            elif isinstance(module, torch.nn.ConvTranspose2d):
                normal(module.weight, math.sqrt(2.0 / module.weight.shape[0]))
                normal(module.bias, 0.05)
            elif isinstance(module, torch.nn.BatchNorm2d):
                # Small scale on each residual branch's last BN keeps the sum O(1).
                last = name.endswith(("bn3", "downsample.1"))
                uniform(module.weight, 0.2, 0.4) if last else uniform(module.weight, 0.6, 1.2)
                normal(module.bias, 0.1)
                normal(module.running_mean, 0.2)
                uniform(module.running_var, 0.5, 2.0)
        rpn = model.rpn.head
        rpn.bbox_pred.weight.mul_(0.3)  # modest box deltas
        box = model.roi_heads.box_predictor
        box.cls_score.weight.mul_(3.0)
        box.cls_score.bias[0] = -2.0  # background less likely: scores > 0.05
        box.bbox_pred.weight.mul_(0.5)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(2.0)


def _ceil32(x: int) -> int:
    return int(math.ceil(x / 32) * 32)


def run_both():
    """Runs torchvision and ours on the two images; returns everything compared."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    randomize_torchvision(tv, seed=0)
    tv.eval()
    images = [synthetic_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SHAPES)]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    with torch.no_grad():
        batch, _ = tv.transform(tensors)
        feats = tv.backbone(batch.tensors)
        proposals, _ = tv.rpn(batch, feats)
        dets, _ = tv.roi_heads(feats, proposals, batch.image_sizes)
        dets = tv.transform.postprocess(dets, batch.image_sizes, [im.shape[:2] for im in images])
    ref = {
        "padded": tuple(batch.tensors.shape[-2:]),
        "image_sizes": [tuple(s) for s in batch.image_sizes],
        "features": [f.permute(0, 2, 3, 1).numpy() for f in feats.values()],
        "proposals": [p.numpy() for p in proposals],
        "detections": [{k: v.numpy() for k, v in d.items()} for d in dets],
    }

    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    config = config_from_state_dict(state, min_size=MIN_SIZE, max_size=MAX_SIZE)
    variables = convert_torchvision_state_dict(state, config)
    sizes = [resized_size(h, w, MIN_SIZE, MAX_SIZE) for h, w in IMAGE_SHAPES]
    padded = (max(_ceil32(h) for h, _ in sizes), max(_ceil32(w) for _, w in sizes))
    batch_np = np.zeros((len(images), *padded, 3), np.float32)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        batch_np[i, :h, :w] = resize_image(im, (h, w))
    model = MaskRCNN(config)
    fn = jax.jit(lambda v, x, s: model.apply(v, x, s, intermediates=True))
    out = jax.device_get(fn(variables, jnp.asarray(batch_np), jnp.asarray(sizes, jnp.int32)))
    ours_dets = [
        Predictor._postprocess(
            {k: out[k][i] for k in ("boxes", "scores", "labels", "masks", "valid")},
            sizes[i],
            IMAGE_SHAPES[i],
            None,
        )
        for i in range(len(images))
    ]
    ours = {
        "padded": padded,
        "image_sizes": sizes,
        "features": [np.asarray(f) for f in out["features"]],
        "proposals": [out["proposals"][i][out["proposal_valid"][i]] for i in range(len(images))],
        "detections": ours_dets,
    }
    return ref, ours


@pytest.fixture(scope="module")
def both():
    return run_both()


def feature_errors(ref, ours) -> list[float]:
    """Per level: max |ours - ref| / max |ref|."""
    return [
        float(np.abs(o - r).max() / np.abs(r).max())
        for r, o in zip(ref["features"], ours["features"])
    ]


def proposal_recall(a: np.ndarray, b: np.ndarray, iou: float = 0.99) -> float:
    """Fraction of boxes in ``a`` that some box of ``b`` overlaps with IoU >= iou."""
    if len(a) == 0:
        return 1.0
    m = np.asarray(box_iou(jnp.asarray(a), jnp.asarray(b)))
    return float((m.max(axis=1) >= iou).mean())


def match_detections(src: dict, dst: dict, margin: float = 1e-3):
    """Matches each confident detection of ``src`` to one of ``dst``.

    Detections within ``margin`` of a decision boundary (the 0.05 score
    threshold, or the last kept score when the output is full) are exempt:
    a 1e-6 difference may legitimately flip them.

    Returns:
      (pairs [(i_src, i_dst)], unmatched src indices).
    """
    floor = 0.05 + margin
    if len(src["scores"]) == 100 or len(dst["scores"]) == 100:
        floor = max(floor, min(src["scores"].min(), dst["scores"].min()) + margin)
    ious = (
        np.asarray(box_iou(jnp.asarray(src["boxes"]), jnp.asarray(dst["boxes"])))
        if len(dst["boxes"])
        else None
    )
    pairs, unmatched = [], []
    for i in range(len(src["scores"])):
        if src["scores"][i] < floor:
            continue
        ok = (
            np.zeros(len(dst["scores"]), bool)
            if ious is None
            else (
                (ious[i] >= 0.99)
                & (dst["labels"] == src["labels"][i])
                & (np.abs(dst["scores"] - src["scores"][i]) <= 1e-3)
            )
        )
        if ok.any():
            pairs.append((i, int(np.argmax(np.where(ok, ious[i], -1)))))
        else:
            unmatched.append(i)
    return pairs, unmatched


def mask_ious(ref_det: dict, our_det: dict, pairs) -> list[float]:
    out = []
    for i, j in pairs:
        a, b = ref_det["masks"][i, 0] > 0.5, our_det["masks"][j] > 0.5
        union = (a | b).sum()
        out.append(float((a & b).sum() / union) if union else 1.0)
    return out


def test_same_padding(both):
    ref, ours = both
    assert ours["padded"] == ref["padded"]
    assert [tuple(map(int, s)) for s in ours["image_sizes"]] == [
        tuple(map(int, s)) for s in ref["image_sizes"]
    ]


def test_fpn_features(both):
    ref, ours = both
    assert [f.shape for f in ours["features"]] == [f.shape for f in ref["features"]]
    assert max(feature_errors(ref, ours)) <= 1e-4


def test_proposals(both):
    ref, ours = both
    for r, o in zip(ref["proposals"], ours["proposals"]):
        assert abs(len(r) - len(o)) <= 0.01 * len(r)
        assert proposal_recall(r, o) >= 0.99
        assert proposal_recall(o, r) >= 0.99
        np.testing.assert_allclose(o[:50], r[:50], atol=1e-2)  # the best ones, in order


def test_detections_and_masks(both):
    ref, ours = both
    for r, o in zip(ref["detections"], ours["detections"]):
        assert len(r["scores"]) >= 10, "random weights should give detections"
        pairs, missing = match_detections(r, o)
        assert not missing, f"torchvision detections without a match: {missing}"
        _, extra = match_detections(o, r)
        assert not extra, f"our detections without a torchvision match: {extra}"
        assert min(mask_ious(r, o, pairs)) >= 0.98


if __name__ == "__main__":
    import time

    t = time.time()
    ref, ours = run_both()
    print(f"ran both in {time.time() - t:.1f}s; padded {ours['padded']} vs {ref['padded']}")
    print("FPN rel err per level:", [f"{e:.2e}" for e in feature_errors(ref, ours)])
    for k, (r, o) in enumerate(zip(ref["proposals"], ours["proposals"])):
        print(
            f"image {k}: proposals tv {len(r)} ours {len(o)}; recall {proposal_recall(r, o):.4f}/{proposal_recall(o, r):.4f}; "
            f"top-50 max abs diff {np.abs(o[:50] - r[:50]).max():.2e}"
        )
    for k, (r, o) in enumerate(zip(ref["detections"], ours["detections"])):
        pairs, missing = match_detections(r, o)
        _, extra = match_detections(o, r)
        ious = mask_ious(r, o, pairs)
        print(
            f"image {k}: detections tv {len(r['scores'])} ours {len(o['scores'])}; matched {len(pairs)}, "
            f"missing {missing}, extra {extra}; min mask IoU {min(ious) if ious else None}; "
            f"scores tv {r['scores'][:5]} ours {o['scores'][:5]}"
        )
