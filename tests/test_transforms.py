"""Geometry of the per-example transforms, the box-cropped masks and truncation.

Pure numpy: no dataset is built here (see test_data.py for the builders and
the grain pipeline).
"""

from __future__ import annotations

import logging

import chex
import numpy as np
import pytest

from maskrcnn_jax.data import features, images, mask_crop, masks, shapes, transforms


def _example(image: np.ndarray, inst_masks: list[np.ndarray], labels, crowd=None, image_id=7):
    """A stored example from full masks (boxes are the masks' tight boxes)."""
    rles = [masks.encode_mask(m) for m in inst_masks]
    h, w = image.shape[:2]
    boxes = [masks.rle_area_and_box(r, h, w)[1] for r in rles]
    n = len(rles)
    crowd = [False] * n if crowd is None else crowd
    return features.make_example(
        images.encode_png(image), image_id, "x.png", h, w, ids=list(range(n)),
        boxes=np.asarray(boxes), labels=labels, is_crowd=crowd,
        areas=[float(m.sum()) for m in inst_masks], masks=rles,
    )


def _scene(h: int = 90, w: int = 120) -> tuple[np.ndarray, list[np.ndarray]]:
    """Non-overlapping rectangle, disc and triangle-ish blobs, touching one edge."""
    yy, xx = np.mgrid[0:h, 0:w]
    rect = (yy >= 10) & (yy < 40) & (xx >= 5) & (xx < 50)
    disc = (yy - 60) ** 2 + (xx - 80) ** 2 < 20**2
    tri = (yy >= 5) & (yy < 35) & (xx >= 70) & (xx - 70 < (yy - 5)) & (xx < w)
    edge = (yy >= 50) & (yy < h) & (xx >= 0) & (xx < 12)  # touches left/bottom borders
    inst = [rect, disc, tri, edge]
    image = np.zeros((h, w, 3), np.uint8)
    return image, inst


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _paste(crop: np.ndarray, box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-cell paste of an [S, S] box crop into an [h, w] frame."""
    s = crop.shape[0]
    out = np.zeros(hw, bool)
    x0, y0, x1, y1 = box
    xs = np.arange(hw[1]) + 0.5
    ys = np.arange(hw[0]) + 0.5
    cx = np.floor((xs - x0) / max(x1 - x0, 1e-6) * s).astype(int)
    cy = np.floor((ys - y0) / max(y1 - y0, 1e-6) * s).astype(int)
    inx = (cx >= 0) & (cx < s)
    iny = (cy >= 0) & (cy < s)
    out[np.ix_(iny, inx)] = crop[np.ix_(cy[iny], cx[inx])] > 0
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("lsj", [False, True], ids=["resize", "lsj"])
def test_image_boxes_and_masks_stay_aligned(lsj):
    """After flip + resize (+ LSJ crop/pad) the image, box and crop agree within a pixel."""
    image, inst = _scene()
    # Each instance painted in its own grey level, so the image can be checked too.
    for k, m in enumerate(inst):
        image[m] = 60 * (k + 1)
    example = _example(image, inst, labels=[1, 2, 3, 4])
    spec = transforms.InputSpec(
        image_size=(160, 160), scales=(70, 100, 140), max_size=160, flip=True, lsj=lsj,
        lsj_min_scale=0.5, lsj_max_scale=2.5, max_instances=6, mask_size=32,
    )
    flips = set()
    for seed in range(10):
        out = transforms.preprocess(example, spec, train=True, rng=np.random.default_rng(seed))
        geom = transforms.sample_geometry(90, 120, spec, True, np.random.default_rng(seed))
        flips.add(geom.flip)
        chex.assert_shape(out["image"], (160, 160, 3))
        chex.assert_shape(out["masks"], (6, 32, 32))
        np.testing.assert_array_equal(out["image_size"], [geom.out_h, geom.out_w])
        assert not out["image"][geom.out_h :].any() and not out["image"][:, geom.out_w :].any()
        for slot in np.flatnonzero(out["valid"]):
            k = out["labels"][slot] - 1
            # Reference: the full mask through the image path (bilinear), thresholded.
            ref = transforms.transform_image(
                np.repeat(inst[k][..., None] * np.uint8(255), 3, -1), geom, spec
            )[..., 0] >= 128
            box = out["boxes"][slot]
            if ref.sum() < 4:
                continue
            # Same resampling as the image: the image and the box agree within a pixel.
            np.testing.assert_allclose(_bbox(ref), box, atol=1.0)
            if ref.sum() > 100:  # The image shows instance k there.
                assert abs(np.median(out["image"][ref, 0]) - 60 * (k + 1)) < 10
            # The box-cropped mask pasted back covers the reference mask.
            pasted = _paste(out["masks"][slot], box, (160, 160))
            assert _iou(pasted, ref) > 0.85, (seed, k, _iou(pasted, ref))
            # Every edge of the crop is touched by the mask (mask bbox == box).
            crop = out["masks"][slot]
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
    assert flips == {False, True}


def test_resize_geometry_golden():
    """Detectron2 ResizeShortestEdge numbers: 480x640 -> short 800, long capped at 1333.

    Without augmentation (train=False) the shorter side is the largest of ``scales``.
    """
    spec = transforms.InputSpec(image_size=(1344, 1344), scales=(640, 800), max_size=1333,
                                flip=False)
    g = transforms.sample_geometry(480, 640, spec, train=False, rng=None)
    assert (g.out_h, g.out_w) == (800, 1067) and g.scale == pytest.approx(800 / 480)
    g = transforms.sample_geometry(300, 1000, spec, train=False, rng=None)
    assert (g.out_h, g.out_w) == (400, 1333) and g.scale == pytest.approx(1.333)
    boxes, keep = transforms.transform_boxes(np.array([[0, 0, 1000, 300]], np.float32), g)
    np.testing.assert_allclose(boxes, [[0, 0, 1333, 400]])
    assert keep.all()
    flipped = transforms.Geometry(300, 1000, True, g.sx, g.sy, 0, 0, 400, 1333, g.scale)
    boxes, _ = transforms.transform_boxes(np.array([[100, 10, 300, 20]], np.float32), flipped)
    np.testing.assert_allclose(boxes, [[700 * 1.333, 10 * 400 / 300, 900 * 1.333, 20 * 400 / 300]],
                               rtol=1e-5)


def test_lsj_crop_drops_boxes_outside_and_pads():
    spec = transforms.InputSpec(image_size=(64, 64), lsj=True, flip=False, max_size=64,
                                scales=(64,), max_instances=4, mask_size=16)
    g = transforms.Geometry(100, 100, False, 2.0, 2.0, 100, 100, 64, 64, 2.0)
    boxes, keep = transforms.transform_boxes(
        np.array([[0, 0, 10, 10], [40, 40, 60, 60], [50, 81.8, 60, 90]], np.float32), g
    )
    np.testing.assert_allclose(boxes[1], [0, 0, 20, 20])
    assert keep.tolist() == [False, True, False]  # Outside; kept; cut to a 0.4 px sliver.
    spec_eval = transforms.sample_geometry(50, 100, spec, train=False, rng=None)
    assert (spec_eval.out_h, spec_eval.out_w) == (32, 64)


def test_truncation_is_counted_and_warned(caplog):
    h = w = 64
    inst = []
    for k in range(5):
        m = np.zeros((h, w), bool)
        m[2 + 12 * k : 10 + 12 * k, 5:30] = True
        inst.append(m)
    example = _example(np.zeros((h, w, 3), np.uint8), inst, labels=[1, 2, 3, 1, 2],
                       crowd=[True, False, False, False, False])
    spec = transforms.InputSpec(image_size=(64, 64), scales=(64,), max_size=64,
                                max_instances=3, mask_size=8)
    with caplog.at_level(logging.WARNING):
        out = transforms.preprocess(example, spec, train=False)
    assert out["num_truncated"] == 2
    assert "2 truncated" in caplog.text and "image id 7" in caplog.text
    assert out["valid"].tolist() == [True, True, True]
    assert out["is_crowd"].tolist() == [False, False, False]  # Crowd goes last: truncated.
    assert out["labels"].tolist() == [2, 3, 1]


def test_padding_slots_and_empty_image():
    spec = transforms.InputSpec(image_size=(32, 48), scales=(32,), max_size=32,
                                max_instances=5, mask_size=8, image_dtype="float32")
    example = _example(np.full((20, 30, 3), 200, np.uint8), [], labels=[])
    out = transforms.preprocess(example, spec, train=True, rng=np.random.default_rng(0))
    assert out["image"].dtype == np.float32 and out["image"].max() == 200.0
    chex.assert_shape(out["boxes"], (5, 4))
    assert not out["valid"].any() and not out["labels"].any() and not out["masks"].any()
    assert out["valid_image"] and out["num_truncated"] == 0
    np.testing.assert_array_equal(out["original_size"], [20, 30])
    np.testing.assert_array_equal(out["image_size"], [21, 32])


def test_input_spec_rejects_max_size_larger_than_padding():
    with pytest.raises(ValueError, match="max_size"):
        transforms.InputSpec(image_size=(800, 1344), max_size=1333)


def test_sample_masks_golden():
    """Bilinear sampling on a 4x4 ramp with the half-pixel convention."""
    ramp = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    xs = np.array([[0.5, 1.0, 3.5, 10.0]])  # pixel 0 centre, between 0 and 1, last, outside
    ys = np.array([[0.5, 2.0]])
    got = mask_crop.sample_masks(ramp, xs, ys)
    np.testing.assert_allclose(got[0], [[0, 0.5, 3, 3], [6, 6.5, 9, 9]])


def _mask_crop_error(mask_size: int, num_rois: int = 6, seed: int = 0) -> tuple[float, float]:
    """Mean IoU and pixel disagreement of 28x28 targets: from the crop vs the full mask."""
    rng = np.random.default_rng(seed)
    spec = shapes.ShapesSpec(image_size=320, min_shapes=2, max_shapes=4, min_size=12,
                             max_size=300)
    ious, diffs = [], []
    for _ in range(8):
        _, visible, _ = shapes.generate_shapes_image(rng, spec)
        for m in visible:
            box = _bbox(m)
            crop = mask_crop.crop_masks_to_boxes(m[None], box[None], mask_size)[0]
            wh = box[2:] - box[:2]
            centre = (box[:2] + box[2:]) / 2 + rng.uniform(-0.15, 0.15, (num_rois, 2)) * wh
            size = wh * rng.uniform(0.8, 1.25, (num_rois, 2))
            rois = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
            full = mask_crop.roi_target_from_full_mask(m, rois)
            from_crop = mask_crop.roi_target_from_box_mask(crop, box, rois)
            ious += [_iou(a, b) for a, b in zip(full, from_crop)]
            diffs += [float(np.mean(a != b)) for a, b in zip(full, from_crop)]
    return float(np.mean(ious)), float(np.mean(diffs))


def test_box_cropped_masks_match_full_resolution_targets():
    """The 28x28 targets from S x S box crops vs from the full masks (random proposals)."""
    iou56, diff56 = _mask_crop_error(56)
    iou28, _ = _mask_crop_error(28)
    print(f"mask crop error: S=56 mean IoU {iou56:.4f}, pixels differing {diff56:.4%}; "
          f"S=28 mean IoU {iou28:.4f}")
    assert iou56 > 0.97 and diff56 < 0.01
    assert iou56 >= iou28


def test_shapes_image_masks_are_visible_parts():
    spec = shapes.ShapesSpec(image_size=96, min_shapes=3, max_shapes=4)
    image, visible, labels = shapes.generate_shapes_image(np.random.default_rng(3), spec)
    chex.assert_shape(image, (96, 96, 3))
    assert visible.shape[0] == labels.shape[0] >= 3 - 1
    assert set(labels.tolist()) <= {1, 2, 3}
    # Visible masks are disjoint and each is at least the minimum visible size.
    assert visible.sum(0).max() == 1
    assert (visible.reshape(len(labels), -1).sum(1) >= 40).all()
    again, visible2, _ = shapes.generate_shapes_image(np.random.default_rng(3), spec)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(visible, visible2)
