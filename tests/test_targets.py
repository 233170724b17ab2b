"""Matching, sampling and mask targets (torchvision's Matcher as reference)."""

import chex
import pytest
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from maskrcnn_jax import ops, targets
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.targets import Assignment
from tests.torch_ref import random_boxes


def _torch_match(gt, cand, high, low, low_quality):
    m = Matcher(high, low, allow_low_quality_matches=low_quality)
    idx = m(torchvision.ops.box_iou(torch.from_numpy(gt), torch.from_numpy(cand))).numpy()
    assignment = np.where(idx >= 0, 1, np.where(idx == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
    return idx, assignment


def test_match_equals_torchvision_matcher():
    rng = np.random.default_rng(0)
    anchors = np.asarray(ops.generate_anchors((128, 160), (8, 16), ((32,), (64,))))
    gt = random_boxes(rng, (6,), (128, 160), min_size=10, max_size=80)
    for high, low, lq in [(0.7, 0.3, True), (0.5, 0.5, False)]:
        ref_idx, ref_assign = _torch_match(gt, anchors, high, low, lq)
        # Two padded slots must change nothing.
        gt_pad = np.concatenate([gt, np.zeros((2, 4), np.float32)])
        valid = np.array([True] * 6 + [False] * 2)
        matched, assign = jax.jit(
            lambda a, g, v: targets.match(a, g, v, jnp.zeros(8, bool), high, low, lq)
        )(anchors, gt_pad, valid)
        np.testing.assert_array_equal(assign, ref_assign)
        pos = ref_assign == 1
        assert pos.sum() > 0
        np.testing.assert_array_equal(np.asarray(matched)[pos], ref_idx[pos])


def test_crowd_is_ignored_not_background():
    cand = jnp.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], jnp.float32)
    gt = jnp.array([[0, 0, 10, 10], [40, 40, 80, 80]], jnp.float32)
    _, assign = targets.match(cand, gt, jnp.array([True, True]), jnp.array([False, True]), 0.7, 0.3, True)
    np.testing.assert_array_equal(assign, [Assignment.POSITIVE, Assignment.IGNORE, Assignment.NEGATIVE])


def test_no_ground_truth_is_all_negative():
    cand = jnp.ones((5, 4)) * jnp.array([0, 0, 4, 4.0])
    matched, assign = targets.match(cand, jnp.zeros((0, 4)), jnp.zeros(0, bool), jnp.zeros(0, bool), 0.7, 0.3, True)
    chex.assert_shape(matched, (5,))
    assert bool(jnp.all(assign == Assignment.NEGATIVE))


def test_sample_balanced_counts_and_randomness():
    assign = jnp.array([Assignment.POSITIVE] * 300 + [Assignment.NEGATIVE] * 500 + [Assignment.IGNORE] * 50)
    pos, neg = targets.sample_balanced(assign, jax.random.key(0), 256, 0.5)
    assert int(pos.sum()) == 128 and int(neg.sum()) == 128
    assert not bool((pos & (assign != Assignment.POSITIVE)).any())
    assert not bool((neg & (assign != Assignment.NEGATIVE)).any())
    pos2, _ = targets.sample_balanced(assign, jax.random.key(1), 256, 0.5)
    assert bool((pos != pos2).any())
    few = jnp.array([Assignment.POSITIVE] * 3 + [Assignment.NEGATIVE] * 1000)
    pos, neg = targets.sample_balanced(few, jax.random.key(0), 256, 0.5)
    assert int(pos.sum()) == 3 and int(neg.sum()) == 253


def test_rank_of_smallest_is_the_stable_sort_rank_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 20, 3000).astype(np.float32)  # about 150 entries per value
    full = np.empty(3000, np.int64)
    full[np.argsort(score, kind="stable")] = np.arange(3000)
    for k in (0, 1, 256, 3000, 5000):  # 0: int(num_samples * positive_fraction) can be 0
        rank = np.asarray(jax.jit(targets.rank_of_smallest, static_argnums=1)(score, k))
        kk = min(k, 3000)
        np.testing.assert_array_equal(rank, np.where(full < kk, full, kk), err_msg=f"k={k}")


def test_sample_balanced_equals_sampling_by_a_full_sort():
    """The partial selection picks what ranking every candidate by its random draw did."""

    def by_full_sort(assignment, key, num_samples, positive_fraction):
        def rank(key, mask):
            score = np.where(mask, np.asarray(jax.random.uniform(key, mask.shape)), 2.0)
            r = np.empty(mask.shape, np.int64)
            r[np.argsort(score, kind="stable")] = np.arange(mask.size)
            return r

        pos, neg = assignment == Assignment.POSITIVE, assignment == Assignment.NEGATIVE
        kpos, kneg = jax.random.split(key)
        num_pos = min(pos.sum(), int(num_samples * positive_fraction))
        num_neg = min(neg.sum(), num_samples - num_pos)
        return pos & (rank(kpos, pos) < num_pos), neg & (rank(kneg, neg) < num_neg)

    rng = np.random.default_rng(1)
    for seed, n_pos in [(0, 3), (1, 40), (2, 900)]:
        assign = rng.permutation(
            [Assignment.POSITIVE] * n_pos + [Assignment.NEGATIVE] * 4000 + [Assignment.IGNORE] * 300
        ).astype(np.int32)
        key = jax.random.key(seed)
        got = jax.jit(targets.sample_balanced, static_argnums=(2, 3))(assign, key, 256, 0.25)
        want = by_full_sort(assign, key, 256, 0.25)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"seed {seed}")


def test_roi_targets_layout():
    rng = np.random.default_rng(1)
    gt = random_boxes(rng, (4,), (200, 200), min_size=20, max_size=80)
    gt_labels = np.array([3, 1, 2, 5], np.int32)
    props = np.concatenate([gt + rng.normal(scale=3, size=gt.shape).astype(np.float32) for _ in range(10)] + [random_boxes(rng, (300,), (200, 200), min_size=5)])
    out = jax.jit(lambda *a: targets.roi_targets(*a, num_samples=64, positive_fraction=0.25))(
        props, np.ones(len(props), bool), gt, gt_labels, np.ones(4, bool), np.zeros(4, bool), jax.random.key(0)
    )
    chex.assert_shape(out.rois, (64, 4))
    npos = int(out.positive.sum())
    assert 0 < npos <= 16 and bool(out.positive[:npos].all()) and not bool(out.positive[npos:].any())
    assert int(out.valid.sum()) == 64
    iou = np.asarray(ops.box_iou(out.rois, gt))
    np.testing.assert_array_equal(np.asarray(out.labels)[:npos], gt_labels[np.asarray(out.matched)[:npos]])
    assert (iou[np.arange(64), np.asarray(out.matched)][:npos] >= 0.5).all()
    assert (iou[npos:].max(axis=1) < 0.5).all()
    np.testing.assert_allclose(
        ops.decode_boxes(out.deltas[:npos], out.rois[:npos], ops.ROI_BOX_WEIGHTS),
        gt[np.asarray(out.matched)[:npos]], atol=1e-3,
    )


def _disk_mask(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r).astype(np.float32)


@pytest.mark.parametrize("crop", [28, 56])
def test_separable_mask_targets_equal_roi_align_of_the_crops(crop):
    """``Ay @ crop @ Ax.T`` gives what the gather RoIAlign gives on the padded crops.

    RoIs scattered around their boxes, partly outside them, some smaller than a crop
    pixel. Both sides sum products of weights <= 1 with 0/1 pixels: the gathers 16
    terms (about 18 float32 roundings), the products up to 2 x (S + 2) terms plus the
    matrices' 4 (at most 2 x 58 + 4 roundings at S = 56), so they agree within
    120 * 2**-24 = 7.2e-6, and the thresholded targets agree wherever the value is
    farther than that from 0.5.
    """
    rng = np.random.default_rng(3)
    g, r = 5, 64
    crops = (rng.random((g, crop, crop)) > 0.5).astype(np.float32)
    xy = rng.uniform(0, 80, (g, 2))
    gt_boxes = np.concatenate([xy, xy + rng.uniform(3, 60, (g, 2))], -1).astype(np.float32)
    matched = rng.integers(0, g, r).astype(np.int32)
    rois = gt_boxes[matched] + rng.normal(scale=8, size=(r, 4)).astype(np.float32)
    rois[::7, 2:] = rois[::7, :2] + rng.uniform(0.1, 1.0, (len(rois[::7]), 2))  # tiny RoIs

    values = np.asarray(jax.jit(targets.mask_target_values)(crops, gt_boxes, rois, matched))

    # The same RoIAlign by gathers: every padded crop is a level of its own.
    padded = np.pad(crops, ((0, 0), (1, 1), (1, 1))).reshape(1, -1, 1)
    box = gt_boxes[matched]
    scale = crop / (box[:, 2:] - box[:, :2])
    local = np.concatenate(
        [(rois[:, :2] - box[:, :2]) * scale + 1, (rois[:, 2:] - box[:, :2]) * scale + 1], -1
    )
    ref = roi_align_levels(
        jnp.asarray(padded), jnp.asarray(local[None]), jnp.asarray(matched[None]),
        [(crop + 2, crop + 2)] * g, [1.0] * g, 28, 2, aligned=True,
    )[0, ..., 0]  # fmt: skip
    ref = np.asarray(ref)
    tol = 120 * 2.0**-24
    np.testing.assert_allclose(values, ref, rtol=0, atol=tol)
    assert 0.05 < (values > 0.5).mean() < 0.95  # Both classes of pixel occur.
    clear = np.abs(ref - 0.5) > tol
    binary = np.asarray(targets.mask_targets(crops, gt_boxes, rois, matched))
    np.testing.assert_array_equal(binary[clear], (ref >= 0.5)[clear])


def test_mask_targets_from_cropped_masks_match_full_resolution():
    """Targets from 64x64 box crops agree with targets from the full mask."""
    rng = np.random.default_rng(2)
    h = w = 128
    full = np.stack([_disk_mask(h, w, 40, 50, 25), _disk_mask(h, w, 80, 70, 35)])
    ys, xs = np.nonzero(full[0]); box0 = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    ys, xs = np.nonzero(full[1]); box1 = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    gt_boxes = np.array([box0, box1], np.float32)
    s = 64
    crops = ops.roi_align(full[..., None], gt_boxes[:, None], s, 1.0, 2, aligned=True)[:, 0, ..., 0]
    crops = (crops >= 0.5).astype(jnp.float32)
    matched = rng.integers(0, 2, size=40).astype(np.int32)
    rois = gt_boxes[matched] + rng.normal(scale=6, size=(40, 4)).astype(np.float32)
    ours = targets.mask_targets(crops, gt_boxes, rois, matched)
    full_res = ops.roi_align(full[matched][..., None], rois[:, None], 28, 1.0, 2, aligned=True)
    ref = np.asarray(full_res)[:, 0, ..., 0] >= 0.5
    inter = np.logical_and(np.asarray(ours) > 0, ref).sum((1, 2))
    union = np.logical_or(np.asarray(ours) > 0, ref).sum((1, 2))
    iou = inter / np.maximum(union, 1)
    assert iou.mean() > 0.95 and iou.min() > 0.85, iou
