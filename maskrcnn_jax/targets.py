"""Training targets: IoU matching and balanced sampling, static shapes.

Everything here is written for one image and batched with ``jax.vmap`` by the
caller, with an explicit PRNG key per image. Label meanings are named by
:class:`Assignment`, never bare -1/0/1.

The matching rules equal torchvision's ``Matcher`` (and Detectron2's): a
candidate is positive when its best IoU with a ground-truth box is >= the
high threshold, negative below the low threshold, ignored in between; with
``allow_low_quality_matches`` each ground truth also claims the candidates it
overlaps best. Added here: candidates that fall on a crowd region (their
intersection with a crowd box covers at least ``crowd_ioa_threshold`` of the
candidate) are ignored instead of being called background, and padded
ground-truth slots never match.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import box_area, box_iou, encode_boxes
from maskrcnn_jax.ops.boxes import ROI_BOX_WEIGHTS, RPN_BOX_WEIGHTS
from maskrcnn_jax.ops.roi_geometry import bilinear_matrix, check_sampling_ratio, sample_points


class Assignment(enum.IntEnum):
    """What a candidate (anchor or proposal) is trained as."""

    IGNORE = -1
    NEGATIVE = 0
    POSITIVE = 1


def intersection_over_candidate(candidates: jnp.ndarray, regions: jnp.ndarray) -> jnp.ndarray:
    """Fraction of each candidate covered by each region.

    Args:
      candidates: [N, 4] xyxy; regions: [G, 4] xyxy.

    Returns:
      [N, G] intersection area / candidate area (0 for empty candidates).
    """
    lt = jnp.maximum(candidates[:, None, :2], regions[None, :, :2])
    rb = jnp.minimum(candidates[:, None, 2:], regions[None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    area = box_area(candidates)[:, None]
    return jnp.where(area > 0, wh[..., 0] * wh[..., 1] / jnp.where(area > 0, area, 1), 0)


def match(
    candidates: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_crowd: jnp.ndarray,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
    crowd_ioa_threshold: float = 0.5,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Matches candidates to ground truth.

    Args:
      candidates: [N, 4] xyxy anchors or proposals.
      gt_boxes: [G, 4] xyxy; gt_valid: [G] bool (padding is False);
      gt_crowd: [G] bool, crowd regions (never matched, but candidates on them
        are ignored).

    Returns:
      matched: [N] int32 index of the matched ground truth (0 where none).
      assignment: [N] int32 :class:`Assignment` values.
    """
    if gt_boxes.shape[0] == 0:
        zeros = jnp.zeros(candidates.shape[:1], jnp.int32)
        return zeros, zeros + Assignment.NEGATIVE
    matchable = gt_valid & ~gt_crowd
    iou = box_iou(gt_boxes, candidates)  # [G, N]
    iou = jnp.where(matchable[:, None], iou, -1.0)
    best = jnp.max(iou, axis=0)  # [N]
    matched = jnp.argmax(iou, axis=0).astype(jnp.int32)
    assignment = jnp.where(
        best >= high_threshold,
        Assignment.POSITIVE,
        jnp.where(best < low_threshold, Assignment.NEGATIVE, Assignment.IGNORE),
    )
    if allow_low_quality_matches:
        best_for_gt = jnp.max(iou, axis=1, keepdims=True)  # [G, 1]
        claims = (iou == best_for_gt) & (best_for_gt > 0) & matchable[:, None]
        assignment = jnp.where(jnp.any(claims, axis=0), Assignment.POSITIVE, assignment)
    crowd = gt_valid & gt_crowd
    on_crowd = jnp.max(
        jnp.where(crowd[None, :], intersection_over_candidate(candidates, gt_boxes), 0.0), axis=1
    ) >= crowd_ioa_threshold
    assignment = jnp.where(
        on_crowd & (assignment == Assignment.NEGATIVE), Assignment.IGNORE, assignment
    )
    return matched, assignment.astype(jnp.int32)


def rank_of_smallest(score: jnp.ndarray, k: int) -> jnp.ndarray:
    """Each entry's rank in ``score``'s stable ascending order, for the ``k`` smallest.

    Args:
      score: [N] float, no NaN.
      k: how many ranks to give (static); ``min(k, N)`` is used.

    Returns:
      rank [N] int32: ``argsort(score, stable=True)``'s rank of each of the
      ``k`` smallest entries (ties: lower index first), ``k`` for every other.
      ``lax.top_k`` of ``-score`` puts equal values' lower index first too, and
      is a partial selection: 8 ms against a full sort's 196 ms for two images'
      217k RPN anchors on the CPU.
    """
    k = min(k, score.shape[0])
    _, first = jax.lax.top_k(-score, k)
    return jnp.full(score.shape, k, jnp.int32).at[first].set(jnp.arange(k, dtype=jnp.int32))


def _random_rank(key: jax.Array, mask: jnp.ndarray, k: int) -> jnp.ndarray:
    """The True entries of ``mask`` [N] in a uniformly random order: rank [N] (0 =
    first), exact below ``k`` (static); every other entry ranks ``>= k``."""
    u = jax.random.uniform(key, mask.shape)
    return rank_of_smallest(jnp.where(mask, u, 2.0), k)


def sample_balanced(
    assignment: jnp.ndarray, key: jax.Array, num_samples: int, positive_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """torchvision's BalancedPositiveNegativeSampler with a static shape.

    At most ``int(num_samples * positive_fraction)`` positives, negatives fill
    up to ``num_samples``; both chosen uniformly at random.

    Args:
      assignment: [N] :class:`Assignment` values.
      key: PRNG key.

    Returns:
      positive, negative: [N] bool masks of the sampled candidates.
    """
    pos = assignment == Assignment.POSITIVE
    neg = assignment == Assignment.NEGATIVE
    kpos, kneg = jax.random.split(key)
    max_pos = int(num_samples * positive_fraction)
    num_pos = jnp.minimum(jnp.sum(pos), max_pos)
    num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
    sampled_pos = pos & (_random_rank(kpos, pos, max_pos) < num_pos)
    sampled_neg = neg & (_random_rank(kneg, neg, num_samples) < num_neg)
    return sampled_pos, sampled_neg


class RpnTargets(NamedTuple):
    """Per-anchor RPN targets. Shapes for one image; vmapped adds [B]."""

    positive: jnp.ndarray  # [A] bool, sampled positives
    negative: jnp.ndarray  # [A] bool, sampled negatives
    deltas: jnp.ndarray  # [A, 4] regression targets (meaningful where positive)


def rpn_targets(
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_crowd: jnp.ndarray,
    key: jax.Array,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    crowd_ioa_threshold: float = 0.5,
) -> RpnTargets:
    """Anchor targets of one image (torchvision's ``assign_targets_to_anchors``).

    Args:
      anchors: [A, 4] xyxy; gt_boxes: [G, 4]; gt_valid, gt_crowd: [G] bool.
      key: PRNG key for the sampling.
    """
    matched, assignment = match(
        anchors, gt_boxes, gt_valid, gt_crowd, high_threshold, low_threshold, True,
        crowd_ioa_threshold,
    )
    positive, negative = sample_balanced(assignment, key, num_samples, positive_fraction)
    deltas = encode_boxes(gt_boxes[matched], anchors, RPN_BOX_WEIGHTS)
    deltas = jnp.where(positive[:, None], deltas, 0.0)
    return RpnTargets(positive, negative, deltas)


class RoiTargets(NamedTuple):
    """Sampled RoIs of one image, positives first. Shapes for one image."""

    rois: jnp.ndarray  # [S, 4] xyxy proposals (or ground truth) chosen
    labels: jnp.ndarray  # [S] int32 class, 0 = background
    deltas: jnp.ndarray  # [S, 4] regression targets, weights (10, 10, 5, 5)
    matched: jnp.ndarray  # [S] int32 index of the matched ground truth
    positive: jnp.ndarray  # [S] bool
    valid: jnp.ndarray  # [S] bool, sampled (positive or negative)


def roi_targets(
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    gt_valid: jnp.ndarray,
    gt_crowd: jnp.ndarray,
    key: jax.Array,
    num_samples: int = 512,
    positive_fraction: float = 0.25,
    fg_threshold: float = 0.5,
    bg_threshold: float = 0.5,
    crowd_ioa_threshold: float = 0.5,
) -> RoiTargets:
    """Box-head targets of one image (torchvision's ``select_training_samples``).

    The ground-truth boxes are added to the proposals, candidates are matched
    at IoU 0.5 and ``num_samples`` are drawn with at most ``positive_fraction``
    positive. Slots are ordered positives first, then negatives, then unused
    (``valid`` False), so the first ``int(num_samples * positive_fraction)``
    slots hold every positive, in random order: the mask head runs on a
    prefix of them.

    Args:
      proposals: [P, 4] xyxy; proposal_valid: [P] bool.
      gt_boxes: [G, 4]; gt_labels: [G] int (1..K); gt_valid, gt_crowd: [G] bool.
      key: PRNG key.

    Returns:
      :class:`RoiTargets` with S = num_samples slots.
    """
    candidates = jnp.concatenate([proposals, gt_boxes], axis=0)  # [P + G, 4]
    cand_valid = jnp.concatenate([proposal_valid, gt_valid & ~gt_crowd], axis=0)
    matched, assignment = match(
        candidates, gt_boxes, gt_valid, gt_crowd, fg_threshold, bg_threshold, False,
        crowd_ioa_threshold,
    )
    assignment = jnp.where(cand_valid, assignment, Assignment.IGNORE)
    k_sample, k_order = jax.random.split(key)
    positive, negative = sample_balanced(assignment, k_sample, num_samples, positive_fraction)
    # Positives first, then negatives, each in random order.
    n = candidates.shape[0]
    shuffle = 0.5 * jax.random.uniform(k_order, (n,))
    order_key = jnp.where(positive, 3.0, jnp.where(negative, 2.0, 0.0)) + shuffle
    _, slots = jax.lax.top_k(order_key, num_samples) if n >= num_samples else jax.lax.top_k(
        jnp.pad(order_key, (0, num_samples - n), constant_values=-1.0), num_samples
    )
    in_range = slots < n
    slots = jnp.where(in_range, slots, 0)
    pos = positive[slots] & in_range
    valid = (positive[slots] | negative[slots]) & in_range
    rois = candidates[slots]
    gt_idx = matched[slots]
    labels = jnp.where(pos, gt_labels[gt_idx], 0).astype(jnp.int32)
    deltas = encode_boxes(gt_boxes[gt_idx], rois, ROI_BOX_WEIGHTS)
    deltas = jnp.where(pos[:, None], deltas, 0.0)
    rois = jnp.where(valid[:, None], rois, 0.0)
    return RoiTargets(rois, labels, deltas, gt_idx, pos, valid)


def mask_targets(
    gt_masks: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    rois: jnp.ndarray,
    matched: jnp.ndarray,
    mask_size: int = 28,
    sampling_ratio: int = 2,
) -> jnp.ndarray:
    """Binary mask targets of RoIs, from ground-truth masks cropped to their boxes.

    Instance ``g``'s mask is carried as ``gt_masks[g]``: an S x S resampling
    of the instance mask over its box (pixel ``(i, j)`` covers the box's
    ``i``-th row and ``j``-th column of an S x S grid). Each RoI's target is
    that crop sampled at the RoI's 28 x 28 bins with RoIAlign (pixel-centre
    convention, ``aligned=True``), then thresholded at 0.5 as Detectron2 does.
    A one-pixel zero border keeps samples outside the box at zero.

    Args:
      gt_masks: [G, S, S] float or uint8 in {0, 1}, box-cropped masks.
      gt_boxes: [G, 4] xyxy boxes the crops cover.
      rois: [R, 4] xyxy; matched: [R] int index into the ground truth.

    Returns:
      [R, mask_size, mask_size] float32 in {0, 1}.
    """
    values = mask_target_values(gt_masks, gt_boxes, rois, matched, mask_size, sampling_ratio)
    return (values >= 0.5).astype(jnp.float32)


def mask_target_values(
    gt_masks: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    rois: jnp.ndarray,
    matched: jnp.ndarray,
    mask_size: int = 28,
    sampling_ratio: int = 2,
) -> jnp.ndarray:
    """:func:`mask_targets` before the threshold: RoIAlign of each RoI's matched crop.

    One channel, and a RoI's samples lie on a grid, so RoIAlign is separable:
    ``Ay @ crop @ Ax.T`` with [mask_size, S + 2] interpolation matrices per RoI
    (:func:`~maskrcnn_jax.ops.roi_geometry.bilinear_matrix`), the same value as
    ``roi_align_levels`` on the crops up to float32 summation order. Its gathers
    of 16 one-value taps per target pixel took 56 ms of the shapes recipe's step
    (8 x 32 RoIs, 56x56 crops); the two small products take 8.5 ms. ``HIGHEST``
    precision keeps the products float32 on TPU and GPU, where the threshold
    would otherwise see bf16 or tf32 rounding.

    Args:
      gt_masks: [G, S, S]; gt_boxes: [G, 4] xyxy; rois: [R, 4] xyxy; matched: [R] int.

    Returns:
      [R, mask_size, mask_size] float32 in [0, 1].
    """
    sampling_ratio = check_sampling_ratio(sampling_ratio)
    s = gt_masks.shape[1]
    padded = jnp.pad(gt_masks.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))
    box = gt_boxes[matched]  # [R, 4]
    scale_x = s / jnp.maximum(box[:, 2] - box[:, 0], 1e-6)
    scale_y = s / jnp.maximum(box[:, 3] - box[:, 1], 1e-6)
    local = jnp.stack(
        [
            (rois[:, 0] - box[:, 0]) * scale_x + 1,
            (rois[:, 1] - box[:, 1]) * scale_y + 1,
            (rois[:, 2] - box[:, 0]) * scale_x + 1,
            (rois[:, 3] - box[:, 1]) * scale_y + 1,
        ],
        axis=-1,
    )  # In the padded crop's pixels.

    def matrices(roi):
        ys, xs = sample_points(roi, 1.0, (mask_size, mask_size), sampling_ratio, True)
        return bilinear_matrix(ys, s + 2), bilinear_matrix(xs, s + 2)

    along_y, along_x = jax.vmap(matrices)(local)  # [R, mask_size, S + 2] each
    highest = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("riy,ryx->rix", along_y, padded[matched], precision=highest)
    return jnp.einsum("rix,rjx->rij", rows, along_x, precision=highest)
