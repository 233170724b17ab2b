"""Static-shape greedy non-maximum suppression.

Same kept boxes in the same order as ``torchvision.ops.nms`` /
``batched_nms``: candidates are visited by descending score (ties broken by the
lower index, a stable sort as torchvision's CPU kernel does), and a candidate
is dropped when its IoU with an already kept box is strictly greater than the
threshold. The output is padded to ``max_outputs`` with a ``valid`` mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.boxes import box_iou


def _greedy_keep(iou: jnp.ndarray, candidate: jnp.ndarray, iou_threshold: float) -> jnp.ndarray:
    """Greedy NMS over boxes already sorted by descending score.

    Args:
      iou: [N, N] pairwise IoU of the sorted boxes (entries that must not
        suppress each other, e.g. different classes, set to 0).
      candidate: [N] bool, which sorted boxes may be kept at all.

    Returns:
      [N] bool, kept boxes.
    """
    n = iou.shape[0]
    overlaps = iou > iou_threshold
    later = jnp.arange(n)

    def body(i, state):
        keep, suppressed = state
        keep_i = candidate[i] & ~suppressed[i]
        keep = keep.at[i].set(keep_i)
        suppressed = suppressed | (keep_i & overlaps[i] & (later > i))
        return keep, suppressed

    init = (jnp.zeros((n,), bool), jnp.zeros((n,), bool))
    keep, _ = jax.lax.fori_loop(0, n, body, init)
    return keep


def _nms(boxes, scores, valid, labels, iou_threshold, max_outputs):
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((max_outputs,), jnp.int32), jnp.zeros((max_outputs,), bool)
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = valid & ~jnp.isnan(scores)
    # Invalid entries sort last; stable sort keeps torchvision's tie order.
    key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, stable=True)
    sorted_boxes = boxes[order].astype(jnp.float32)
    iou = box_iou(sorted_boxes, sorted_boxes)
    if labels is not None:
        sorted_labels = labels[order]
        iou = jnp.where(sorted_labels[:, None] == sorted_labels[None, :], iou, 0.0)
    keep = _greedy_keep(iou, valid[order], iou_threshold)
    if max_outputs > n:  # pad so that there are at least max_outputs slots
        keep = jnp.concatenate([keep, jnp.zeros((max_outputs - n,), bool)])
        order = jnp.concatenate([order, jnp.zeros((max_outputs - n,), order.dtype)])
    # Kept positions first, in score order; then padding.
    first = jnp.argsort(~keep, stable=True)[:max_outputs]
    out_valid = keep[first]
    indices = jnp.where(out_valid, order[first], 0).astype(jnp.int32)
    return indices, out_valid


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    max_outputs: int,
    valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS with a static output size.

    Args:
      boxes: [N, 4] xyxy.
      scores: [N].
      iou_threshold: boxes overlapping a kept box with IoU > this are dropped.
      max_outputs: static number of output slots.
      valid: optional [N] bool; invalid boxes are never kept and never
        suppress others.

    Returns:
      indices: [max_outputs] int32 indices into ``boxes`` of the kept boxes,
        by descending score; padded slots hold 0.
      valid: [max_outputs] bool, which slots hold a kept box.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [{boxes.shape[0]}], got {tuple(scores.shape)}")
    return _nms(boxes, scores, valid, None, iou_threshold, max_outputs)


def batched_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    labels: jnp.ndarray,
    iou_threshold: float,
    max_outputs: int,
    valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Class-aware NMS: boxes only suppress boxes of the same label.

    Equal to ``torchvision.ops.batched_nms``. Arguments and outputs as
    :func:`nms`, plus ``labels: [N]`` int class (or level) ids.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores and labels must be [{boxes.shape[0]}], got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    return _nms(boxes, scores, valid, labels, iou_threshold, max_outputs)
