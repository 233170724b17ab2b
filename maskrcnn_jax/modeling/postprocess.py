"""Host-side post-processing to original-image coordinates (numpy).

:func:`resize_boxes` and :func:`paste_masks` reproduce torchvision's
``GeneralizedRCNNTransform.postprocess`` (``resize_boxes`` and
``paste_masks_in_image``): each 28x28 mask, zero-padded by one pixel, is
bilinearly resized into its box (expanded by (M + 2) / M and truncated to
integers) and written into an empty image. Bilinear resizing is separable, so
the resized mask is ``Wy @ padded_mask @ Wx.T`` with cached interpolation
matrices, computed only over the visible part of the box.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def resize_boxes(
    boxes: np.ndarray, resized_size: Sequence[int], original_size: Sequence[int]
) -> np.ndarray:
    """Boxes from the resized image back to the original (torchvision ``resize_boxes``).

    Args:
      boxes: [N, 4] xyxy in resized-image pixels.
      resized_size: (h, w) the image was resized to.
      original_size: (H, W) of the original image.

    Returns:
      [N, 4] float32 xyxy in original pixels (multiplied by original / resized).
    """
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {boxes.shape}")
    ratio_h = np.float32(original_size[0]) / np.float32(resized_size[0])
    ratio_w = np.float32(original_size[1]) / np.float32(resized_size[1])
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def linear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) taps for resizing ``in_size`` -> ``out_size``.

    Returns:
      low, high: [out_size] int source indices; frac: [out_size] float32
      weight of ``high`` (``low`` gets 1 - frac). torch's formula
      ``max(scale * (i + 0.5) - 0.5, 0)`` with ``scale = in / out`` in float32;
      its CPU kernel evaluates the multiply-add as one fused (singly rounded)
      FMA, reproduced here in float64 then rounded, bit for bit.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = low + (low < in_size - 1)
    frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, frac


def _expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """torchvision ``expand_boxes`` then ``.to(int64)`` (truncation), float32 math."""
    b = boxes.astype(np.float32)
    w_half = (b[:, 2] - b[:, 0]) * np.float32(0.5) * np.float32(scale)
    h_half = (b[:, 3] - b[:, 1]) * np.float32(0.5) * np.float32(scale)
    x_c = (b[:, 2] + b[:, 0]) * np.float32(0.5)
    y_c = (b[:, 3] + b[:, 1]) * np.float32(0.5)
    out = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return np.trunc(out).astype(np.int64)


@functools.lru_cache(maxsize=4096)
def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of torch's bilinear resize along one axis."""
    low, high, frac = linear_weights(in_size, out_size)
    mat = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, low), 1 - frac)
    np.add.at(mat, (rows, high), frac)
    mat.setflags(write=False)
    return mat


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: Sequence[int],
    padding: int = 1,
    threshold: float | None = None,
) -> np.ndarray:
    """Pastes box-frame masks into the image, as torchvision's ``paste_masks_in_image``.

    Args:
      masks: [N, M, M] float probabilities (M = 28) in each box's frame.
      boxes: [N, 4] xyxy in image pixels (the image the masks are pasted into).
      image_size: (H, W) of that image.
      padding: zero border added to each mask before resizing (torchvision: 1).
      threshold: if given, return ``probabilities > threshold`` as bool.

    Returns:
      [N, H, W] float32 probabilities (0 outside each box), or bool masks.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be [N, M, M], got {masks.shape}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must be [{masks.shape[0]}, 4], got {boxes.shape}")
    h, w = int(image_size[0]), int(image_size[1])
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        out = np.zeros((0, h, w), np.float32)
        return out > threshold if threshold is not None else out
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))  # [N, M2, M2]
    m2 = m + 2 * padding
    ib = _expand_boxes(boxes, float(m2) / m)  # [N, 4] int64, inclusive pixel bounds
    out = np.zeros((n, h, w), np.float32)
    # Host loop, one small BLAS product per detection restricted to its box
    # (np.dot: numpy's matmul and stacked matmul are far slower here).
    for i, (x0, y0, x1, y1) in enumerate(ib.tolist()):
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, w), max(y0, 0), min(y1 + 1, h)
        if xa >= xb or ya >= yb:
            continue
        wy = interpolation_matrix(m2, max(y1 - y0 + 1, 1))[ya - y0 : yb - y0]  # [rows, M2]
        wx = interpolation_matrix(m2, max(x1 - x0 + 1, 1))[xa - x0 : xb - x0]  # [cols, M2]
        out[i, ya:yb, xa:xb] = np.dot(np.dot(wy, padded[i]), wx.T)
    return out > threshold if threshold is not None else out
