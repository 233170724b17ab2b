"""Box-cropped instance masks: the fixed-size form masks travel in.

A batch never carries full-image masks (``[M, H, W]`` per image would be
100 x 1344 x 1344 bytes). Each instance's mask is instead carried cropped to
its (transformed, clipped) box and resampled to ``S x S`` (``mask_size``), as
the TPU reference Mask R-CNN does. The training code derives 28x28 targets by
resampling these crops into each proposal (RoIAlign on the crop), which equals
RoIAlign on the full mask up to the crop's own resampling error; see
:func:`roi_target_from_full_mask` / :func:`roi_target_from_box_mask` and the
test that measures it.

Coordinates: continuous pixel coordinates, pixel ``i`` covers ``[i, i + 1)``
and its centre is ``i + 0.5`` (the ``aligned=True`` convention). Cell ``j``
of an ``S``-cell crop of box ``[x0, x1]`` has its centre at
``x0 + (j + 0.5) (x1 - x0) / S``; the mask is sampled bilinearly there and
thresholded at 0.5.
"""

from __future__ import annotations

import numpy as np


def cell_centres(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """Centres of ``size`` equal cells of each interval ``[lo, hi]``.

    Args:
      lo: [N] interval starts.
      hi: [N] interval ends.
      size: cells per interval.

    Returns:
      [N, size] float64.
    """
    t = (np.arange(size) + 0.5) / size  # [S]
    lo = np.asarray(lo, np.float64)[:, None]
    hi = np.asarray(hi, np.float64)[:, None]
    return lo + (hi - lo) * t[None, :]


def sample_masks(masks: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinearly samples each mask on its own separable grid.

    Args:
      masks: [N, H, W] masks (any numeric dtype).
      xs: [N, S] continuous x coordinates (pixel centres at i + 0.5).
      ys: [N, T] continuous y coordinates.

    Returns:
      [N, T, S] float32; samples outside the image clamp to the border pixel.
    """
    if masks.ndim != 3 or xs.ndim != 2 or ys.ndim != 2:
        raise ValueError(f"need masks [N,H,W], xs [N,S], ys [N,T]; got "
                         f"{masks.shape}, {xs.shape}, {ys.shape}")
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, ys.shape[1], xs.shape[1]), np.float32)
    x0, x1, wx = _interp_index(xs, w)  # [N, S] each
    y0, y1, wy = _interp_index(ys, h)  # [N, T] each
    idx = np.arange(n)[:, None, None]
    m = masks

    def at(yi, xi):
        return m[idx, yi[:, :, None], xi[:, None, :]].astype(np.float32)  # [N, T, S]

    wx = wx[:, None, :]
    wy = wy[:, :, None]
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def crop_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops full-image masks to boxes of the same frame, at ``size x size``.

    Args:
      masks: [N, H, W] {0, 1} masks.
      boxes: [N, 4] xyxy in the masks' pixel frame.
      size: S.

    Returns:
      [N, S, S] uint8 {0, 1}.
    """
    xs = cell_centres(boxes[:, 0], boxes[:, 2], size)
    ys = cell_centres(boxes[:, 1], boxes[:, 3], size)
    return (sample_masks(masks, xs, ys) >= 0.5).astype(np.uint8)


def roi_target_from_full_mask(mask: np.ndarray, rois: np.ndarray, size: int = 28) -> np.ndarray:
    """Reference mask targets: each RoI resampled from the full mask (Detectron2 way).

    Args:
      mask: [H, W] {0, 1} full-image mask.
      rois: [R, 4] xyxy proposals in the mask's frame.
      size: target side (28).

    Returns:
      [R, size, size] bool, bilinear samples at cell centres >= 0.5.
    """
    masks = np.broadcast_to(mask, (len(rois),) + mask.shape)
    return crop_masks_to_boxes(masks, rois, size).astype(bool)


def roi_target_from_box_mask(
    box_mask: np.ndarray, box: np.ndarray, rois: np.ndarray, size: int = 28
) -> np.ndarray:
    """Mask targets resampled from a box-cropped mask (what training does).

    The RoI's cell centres are mapped into the crop's cell frame and sampled
    bilinearly; outside the crop (outside the box) the mask is 0.

    Args:
      box_mask: [S, S] {0, 1} the instance's mask cropped to ``box``.
      box: [4] xyxy, the crop's box.
      rois: [R, 4] xyxy proposals, same frame as ``box``.
      size: target side (28).

    Returns:
      [R, size, size] bool.
    """
    s = box_mask.shape[0]
    bw = max(float(box[2] - box[0]), 1e-6)
    bh = max(float(box[3] - box[1]), 1e-6)
    # Image coordinates -> crop coordinates (crop pixel j covers [j, j + 1)).
    xs = (cell_centres(rois[:, 0], rois[:, 2], size) - box[0]) * (s / bw)  # [R, size]
    ys = (cell_centres(rois[:, 1], rois[:, 3], size) - box[1]) * (s / bh)
    padded = np.pad(box_mask.astype(np.float32), 1)  # Zero outside the box.
    masks = np.broadcast_to(padded, (len(rois),) + padded.shape)
    return sample_masks(masks, xs + 1, ys + 1) >= 0.5


def _interp_index(coords: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weight of the upper one, pixel centres at i + 0.5."""
    u = np.clip(np.asarray(coords, np.float64) - 0.5, 0, length - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, length - 1)
    return i0, i1, (u - i0).astype(np.float32)
