"""Fast R-CNN box head (torchvision ``TwoMLPHead`` + ``FastRCNNPredictor``) and
its inference post-processing (``RoIHeads.postprocess_detections``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import Dense
from maskrcnn_jax.ops import (
    FPN_STRIDES,
    ROI_BOX_WEIGHTS,
    batched_nms,
    clip_boxes,
    decode_boxes,
    multilevel_roi_pooler,
)


class BoxHead(nn.Module):
    """RoIAlign 7x7 on P2..P5 -> fc6 -> fc7 -> class logits and per-class deltas.

    The pooled [7, 7, C] features are flattened in NHWC (h, w, c) order; the
    converter permutes the rows of torchvision's fc6 (flattened c, h, w) to
    match, so the function computed is the same.

    Attributes:
      num_classes: K, including background.
      representation_size: width of fc6 / fc7.
      roi_size, sampling_ratio: RoI pooling output size and RoIAlign samples.
      roi_pooler: ``"align"``, ``"align_v2"`` or ``"pool"`` (``ops.ROI_POOLERS``).
      roi_align_impl: implementation of the align variants (``ops.roi_align_impl_names``).
      strides: strides of the FPN levels P2..P6; RoIAlign reads P2..P5.
    """

    num_classes: int = 91
    representation_size: int = 1024
    roi_size: int = 7
    sampling_ratio: int = 2
    roi_align_impl: str = "reference"
    roi_pooler: str = "align"
    dtype: Any = jnp.float32
    strides: Sequence[int] = FPN_STRIDES

    @nn.compact
    def __call__(
        self, features: Sequence[jnp.ndarray], rois: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Scores and boxes of regions.

        Args:
          features: [P2, P3, P4, P5(, P6)], each [B, h_l, w_l, C]; P6 unused.
          rois: [B, R, 4] xyxy input pixels (no gradient flows to them).

        Returns:
          class_logits: [B, R, K] float32.
          box_deltas: [B, R, K, 4] float32, coded with ``ROI_BOX_WEIGHTS``.
        """
        b, r = rois.shape[:2]
        x = multilevel_roi_pooler(
            list(features[:4]),
            rois,
            self.roi_size,
            tuple(self.strides[:4]),
            pooler=self.roi_pooler,
            sampling_ratio=self.sampling_ratio,
            impl=self.roi_align_impl,
        )  # [B, R, 7, 7, C]
        x = x.reshape(b, r, -1)
        x = nn.relu(Dense(self.representation_size, self.dtype, name="fc6")(x))
        x = nn.relu(Dense(self.representation_size, self.dtype, name="fc7")(x))
        logits = Dense(self.num_classes, self.dtype, name="cls_score")(x)
        deltas = Dense(4 * self.num_classes, self.dtype, name="bbox_pred")(x)
        return (
            logits.astype(jnp.float32),
            deltas.reshape(b, r, self.num_classes, 4).astype(jnp.float32),
        )


def detect_single(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_size: jnp.ndarray,
    score_thresh: float,
    nms_thresh: float,
    min_size: float,
    detections_per_img: int,
    candidates: int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Detections of one image; see :func:`detect`."""
    r, k = class_logits.shape
    boxes = decode_boxes(box_deltas, proposals[:, None, :], ROI_BOX_WEIGHTS)  # [R, K, 4]
    boxes = clip_boxes(boxes, image_size)
    scores = jax.nn.softmax(class_logits, axis=-1)
    # Every (proposal, foreground class) pair is a candidate; background dropped.
    boxes = boxes[:, 1:].reshape(-1, 4)  # [R*(K-1), 4]
    scores = scores[:, 1:].reshape(-1)
    labels = jnp.tile(jnp.arange(1, k, dtype=jnp.int32), r)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    valid = (
        jnp.repeat(proposal_valid, k - 1)
        & (scores > score_thresh)
        & (w >= min_size)
        & (h >= min_size)
    )
    # Static cap on NMS candidates: the best `candidates` valid ones.
    c = min(candidates, scores.shape[0])
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -1.0), c)
    boxes, scores, labels, valid = boxes[idx], scores[idx], labels[idx], valid[idx]
    keep, keep_valid = batched_nms(boxes, scores, labels, nms_thresh, detections_per_img, valid)
    out_boxes = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
    out_scores = jnp.where(keep_valid, scores[keep], 0.0)
    out_labels = jnp.where(keep_valid, labels[keep], 0)
    return out_boxes, out_scores, out_labels, keep_valid


def detect(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_sizes: jnp.ndarray,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    min_size: float = 1e-2,
    detections_per_img: int = 100,
    candidates: int = 2000,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Final detections, as torchvision's ``RoIHeads.postprocess_detections``.

    Per-class decode, clip, softmax, drop background, score > score_thresh,
    drop boxes with a side < min_size, class-aware NMS, best
    ``detections_per_img``. Only the ``candidates`` best-scoring valid
    (proposal, class) pairs enter NMS (static shape; see the model config).

    Args:
      class_logits: [B, R, K]; box_deltas: [B, R, K, 4].
      proposals: [B, R, 4] xyxy; proposal_valid: [B, R] bool.
      image_sizes: [B, 2] int (h, w) inside the padding.

    Returns:
      boxes: [B, D, 4] xyxy, by descending score; padded slots zeros.
      scores: [B, D]; labels: [B, D] int32 (1..K-1, 0 in padded slots);
      valid: [B, D] bool. D = detections_per_img.
    """
    if class_logits.ndim != 3 or box_deltas.shape != (*class_logits.shape, 4):
        raise ValueError(
            f"class_logits must be [B, R, K] and box_deltas [B, R, K, 4], got "
            f"{tuple(class_logits.shape)} and {tuple(box_deltas.shape)}"
        )
    fn = functools.partial(
        detect_single,
        score_thresh=float(score_thresh),
        nms_thresh=float(nms_thresh),
        min_size=float(min_size),
        detections_per_img=int(detections_per_img),
        candidates=int(candidates),
    )
    return jax.vmap(fn)(class_logits, box_deltas, proposals, proposal_valid, image_sizes)
