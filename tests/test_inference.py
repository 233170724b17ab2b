"""Predictor: torchvision-equal resize and paste, output format, bucketing, checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maskrcnn_jax.inference import Predictor, default_buckets, resize_image, resized_size
from maskrcnn_jax.modeling.mask_rcnn import normalize_images
from maskrcnn_jax.modeling.postprocess import paste_masks, resize_boxes


@pytest.mark.parametrize(
    "shape, min_size, max_size",
    [
        ((480, 640), 800, 1333),
        ((203, 297), 320, 512),
        ((333, 1000), 800, 1333),
        ((900, 500), 320, 512),
        ((37, 41), 64, 96),
    ],
)
def test_resize_matches_torchvision_transform(shape, min_size, max_size):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    transform = GeneralizedRCNNTransform(min_size, max_size, mean, std).eval()
    with torch.no_grad():
        batch, _ = transform([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    ref = batch.tensors[0].permute(1, 2, 0).numpy()
    size = resized_size(*shape, min_size, max_size)
    assert size == tuple(batch.image_sizes[0])
    padded = np.zeros((1, *ref.shape[:2], 3), np.float32)
    padded[0, : size[0], : size[1]] = resize_image(image, size)
    ours = normalize_images(jnp.asarray(padded), jnp.asarray([size]), mean, std)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("shape, size", [((37, 41), (80, 101)), ((60, 50), (31, 77))])
def test_resize_matches_interpolate_and_jax_upscaling(shape, size):
    image = np.random.default_rng(1).uniform(0, 255, (*shape, 3)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(resize_image(image, size), ref, atol=1e-3)
    if size[0] >= shape[0] and size[1] >= shape[1]:  # jax.image.resize agrees when upscaling
        jax_out = jax.image.resize(jnp.asarray(image), (*size, 3), "linear", antialias=False)
        np.testing.assert_allclose(jax_out, ref, atol=1e-3)


def test_paste_masks_matches_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(0)
    h, w, n = 97, 131, 40
    masks = rng.uniform(0, 1, (n, 28, 28)).astype(np.float32)
    xy = rng.uniform(-20, 130, (n, 2))
    boxes = np.concatenate([xy, xy + rng.exponential(30, (n, 2))], 1)
    boxes[:4, 2:] = boxes[:4, :2] + rng.uniform(0, 1.5, (4, 2))  # sub-pixel boxes
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)  # detections are clipped
    ref = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (h, w))
    ours = paste_masks(masks, boxes, (h, w))
    np.testing.assert_allclose(ours, ref[:, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(paste_masks(masks, boxes, (h, w), threshold=0.5), ours > 0.5)
    assert paste_masks(masks[:0], boxes[:0], (h, w)).shape == (0, h, w)


def test_resize_boxes_matches_torchvision():
    from torchvision.models.detection.transform import resize_boxes as tv_resize_boxes

    boxes = np.random.default_rng(0).uniform(0, 300, (10, 4)).astype(np.float32)
    ref = tv_resize_boxes(torch.from_numpy(boxes), [320, 468], [203, 297]).numpy()
    np.testing.assert_array_equal(resize_boxes(boxes, (320, 468), (203, 297)), ref)


def test_default_buckets_cover_all_resized_sizes():
    buckets = default_buckets(800, 1333)
    assert len(buckets) <= 7 and (800, 1344) in buckets and (1344, 800) in buckets
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 4000, (200, 2)):
        rh, rw = resized_size(int(h), int(w), 800, 1333)
        assert any(rh <= bh and rw <= bw for bh, bw in buckets)


@pytest.fixture(scope="module")
def predictor(tiny_model, tiny_model_config):
    # The variables do not depend on box_score_thresh: the shared tiny model's serve.
    _, variables = tiny_model
    return Predictor(variables, tiny_model_config(box_score_thresh=0.05))


def test_predictor_outputs_and_bucketing(predictor):
    rng = np.random.default_rng(0)
    shapes = [
        (60, 80),
        (80, 60),
        (64, 64),
        (100, 300),
        (300, 100),
        (33, 47),
        (480, 640),
        (47, 33),
        (97, 150),
        (150, 97),
        (64, 120),
        (1000, 999),
    ]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    results = predictor(images)
    assert len(results) == len(images)
    for image, r in zip(images, results):
        n = len(r["scores"])
        assert r["boxes"].shape == (n, 4) and r["boxes"].dtype == np.float32
        assert r["labels"].shape == (n,) and r["labels"].dtype == np.int64
        assert r["masks"].shape == (n, *image.shape[:2]) and r["masks"].dtype == np.float32
        assert (r["boxes"][:, 2] <= image.shape[1] + 1e-3).all()
        assert (r["boxes"][:, 3] <= image.shape[0] + 1e-3).all()
        assert (np.diff(r["scores"]) <= 0).all() and (r["scores"] > 0.05).all()
    assert any(len(r["scores"]) for r in results)
    # 12 image sizes, a handful of buckets: one compilation per bucket used.
    assert predictor.num_compilations <= len(predictor.buckets) <= 7
    thresholded = predictor(images[:1], mask_threshold=0.5)[0]["masks"]
    assert thresholded.dtype == np.bool_


def test_predictor_batches_like_single_images(predictor):
    """Batching (and its padding slots) does not change an image's result."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(3)]
    batched = Predictor(predictor.variables, predictor.config, batch_size=2)(images)
    for image, r in zip(images, batched):
        single = predictor([image])[0]
        np.testing.assert_allclose(r["scores"], single["scores"], atol=1e-5)
        np.testing.assert_allclose(r["boxes"], single["boxes"], atol=1e-3)


def test_predictor_rejects_bad_images(predictor):
    good = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        predictor([good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"image 1: expected shape \[H, W, 3\]"):
        predictor([good, np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="RGB"):
        predictor([np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(ValueError, match="list"):
        predictor(good)


def test_postprocess_without_detections():
    d = 8
    out = {
        "boxes": np.zeros((d, 4), np.float32),
        "scores": np.zeros(d, np.float32),
        "labels": np.zeros(d, np.int32),
        "masks": np.zeros((d, 28, 28), np.float32),
        "valid": np.zeros(d, bool),
    }
    r = Predictor._postprocess(out, (64, 90), (50, 70), None)
    assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].shape == (0,)
    assert r["masks"].shape == (0, 50, 70)
