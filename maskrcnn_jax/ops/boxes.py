"""Box geometry: area, clipping, IoU and the R-CNN box coding.

Boxes are ``[x1, y1, x2, y2]`` in absolute pixels of the network input, with
no "+1" convention (torchvision and Detectron2 agree on this). All functions
broadcast over leading batch dimensions and keep static shapes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# torchvision's `bbox_xform_clip`: width/height deltas are clamped to this
# before `exp`, so a wild regression can grow a box at most 1000/16 times.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Weights of the two box coders of Faster R-CNN.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _check_last_dim(name: str, x: jnp.ndarray, n: int = 4) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"{name} must have shape [..., {n}], got {tuple(x.shape)}")


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of boxes.

    Args:
      boxes: [..., 4] xyxy.

    Returns:
      [...] area, ``(x2 - x1) * (y2 - y1)`` (negative for inverted boxes, as in
      torchvision).
    """
    _check_last_dim("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def clip_boxes(boxes: jnp.ndarray, image_size: Sequence[int] | jnp.ndarray) -> jnp.ndarray:
    """Clips boxes to an image, like ``torchvision.ops.clip_boxes_to_image``.

    Args:
      boxes: [..., 4] xyxy, absolute pixels.
      image_size: (height, width): python ints, or an array [..., 2] that
        broadcasts against ``boxes[..., 0]`` (one size per image).

    Returns:
      [..., 4] boxes with x in [0, width] and y in [0, height].
    """
    _check_last_dim("boxes", boxes)
    size = jnp.asarray(image_size, dtype=boxes.dtype)
    h, w = size[..., 0], size[..., 1]
    if size.ndim > 1:
        h, w = h[..., None], w[..., None]
    x1 = jnp.clip(boxes[..., 0], 0, w)
    y1 = jnp.clip(boxes[..., 1], 0, h)
    x2 = jnp.clip(boxes[..., 2], 0, w)
    y2 = jnp.clip(boxes[..., 3], 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise intersection over union.

    Args:
      boxes1: [..., N, 4] xyxy.
      boxes2: [..., M, 4] xyxy (same leading dims as ``boxes1``).

    Returns:
      [..., N, M] IoU. Where the union is empty (two zero-area boxes, e.g.
      padding) the IoU is 0, where torchvision would give NaN.
    """
    _check_last_dim("boxes1", boxes1)
    _check_last_dim("boxes2", boxes2)
    area1 = box_area(boxes1)[..., :, None]
    area2 = box_area(boxes2)[..., None, :]
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    safe = jnp.where(union > 0, union, 1)
    return jnp.where(union > 0, inter / safe, 0)


def _centers_and_sizes(boxes: jnp.ndarray):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(
    boxes: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: Sequence[float] = RPN_BOX_WEIGHTS,
) -> jnp.ndarray:
    """Regression targets that turn ``anchors`` into ``boxes``.

    The inverse of :func:`decode_boxes`, identical to torchvision's
    ``BoxCoder.encode_single``.

    Args:
      boxes: [..., 4] xyxy target boxes (e.g. matched ground truth).
      anchors: [..., 4] xyxy reference boxes (anchors or proposals), broadcast
        against ``boxes``. Must have positive width and height.
      weights: (wx, wy, ww, wh).

    Returns:
      [..., 4] deltas (dx, dy, dw, dh).
    """
    _check_last_dim("boxes", boxes)
    _check_last_dim("anchors", anchors)
    wx, wy, ww, wh = weights
    ex_x, ex_y, ex_w, ex_h = _centers_and_sizes(anchors)
    gt_x, gt_y, gt_w, gt_h = _centers_and_sizes(boxes)
    dx = wx * (gt_x - ex_x) / ex_w
    dy = wy * (gt_y - ex_y) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    weights: Sequence[float] = RPN_BOX_WEIGHTS,
    clip: float = BBOX_XFORM_CLIP,
) -> jnp.ndarray:
    """Applies regression deltas to reference boxes (torchvision ``decode_single``).

    Args:
      deltas: [..., 4] (dx, dy, dw, dh); for per-class deltas use
        [..., K, 4] with ``anchors`` [..., 1, 4].
      anchors: [..., 4] xyxy reference boxes, broadcast against ``deltas``.
      weights: (wx, wy, ww, wh).
      clip: dw and dh are clamped to at most this before ``exp``.

    Returns:
      [..., 4] decoded boxes, xyxy.
    """
    _check_last_dim("deltas", deltas)
    _check_last_dim("anchors", anchors)
    wx, wy, ww, wh = weights
    ctr_x, ctr_y, widths, heights = _centers_and_sizes(anchors.astype(deltas.dtype))
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack(
        [pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h],
        axis=-1,
    )
