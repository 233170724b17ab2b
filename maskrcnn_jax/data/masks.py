"""Instance-mask encodings: COCO polygons and RLE in, one stored encoding out.

Every instance mask is stored as the compressed COCO RLE string of the full
image (``pycocotools`` "counts" bytes; the size is the image's). Polygons,
uncompressed RLE (crowd) and compressed RLE are all turned into it at
preparation time; the input pipeline decodes it with :func:`decode_rles`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils


class SegmentationError(ValueError):
    """A segmentation that cannot be turned into a mask.

    Attributes:
      reason: short key for skip counting, e.g. ``'polygon_lt_3_points'``.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def segmentation_to_rle(
    segmentation: Any, height: int, width: int, drop_bad_parts: bool = False
) -> tuple[bytes, int]:
    """Turns a COCO ``segmentation`` field into compressed RLE counts.

    Args:
      segmentation: polygons (list of flat ``[x0, y0, x1, y1, ...]`` lists),
        uncompressed RLE (``{'size': [h, w], 'counts': [int, ...]}``, crowd) or
        compressed RLE (``{'size': [h, w], 'counts': str | bytes}``).
      height: image height.
      width: image width.
      drop_bad_parts: drop polygon parts with fewer than 3 points (or an odd
        number of coordinates) instead of raising, as long as one part is left.

    Returns:
      (counts, num_dropped_parts): compressed RLE counts of an [height, width]
      mask, and how many polygon parts were dropped.

    Raises:
      SegmentationError: empty segmentation, a polygon with fewer than 3
        points, an RLE whose size is not the image's, or an unknown format.
    """
    if segmentation is None or (hasattr(segmentation, "__len__") and len(segmentation) == 0):
        raise SegmentationError("empty_segmentation", "empty segmentation")
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if size is None or counts is None:
            raise SegmentationError("bad_rle", "RLE without 'size' or 'counts'")
        if list(size) != [height, width]:
            raise SegmentationError(
                "bad_rle", f"RLE size {list(size)} != image size {[height, width]}"
            )
        if isinstance(counts, list):
            if sum(counts) != height * width:
                raise SegmentationError(
                    "bad_rle", f"RLE counts sum to {sum(counts)}, image has {height * width} pixels"
                )
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": _as_bytes(counts)}
        return _as_bytes(rle["counts"]), 0
    if not isinstance(segmentation, (list, tuple)):
        raise SegmentationError(
            "bad_segmentation", f"unknown segmentation type {type(segmentation)}"
        )
    polygons, dropped = [], 0
    for part in segmentation:
        if not isinstance(part, (list, tuple)) or len(part) < 6 or len(part) % 2:
            if not drop_bad_parts:
                n = len(part) if isinstance(part, (list, tuple)) else "?"
                raise SegmentationError(
                    "polygon_lt_3_points", f"polygon with fewer than 3 points ({n} coordinates)"
                )
            dropped += 1
            continue
        polygons.append([float(v) for v in part])
    if not polygons:
        raise SegmentationError("polygon_lt_3_points", "no polygon with at least 3 points")
    rles = mask_utils.frPyObjects(polygons, height, width)
    rle = mask_utils.merge(rles)
    return _as_bytes(rle["counts"]), dropped


def encode_mask(mask: np.ndarray) -> bytes:
    """Compressed RLE counts of a binary mask.

    Args:
      mask: [H, W] bool or {0, 1} integers.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return _as_bytes(rle["counts"])


def decode_rles(counts: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """Decodes compressed RLE counts into masks.

    Args:
      counts: N compressed RLE strings of [height, width] masks.
      height: mask height.
      width: mask width.

    Returns:
      [N, height, width] uint8 {0, 1} (a transposed view, not C-contiguous).
    """
    if len(counts) == 0:
        return np.zeros((0, height, width), np.uint8)
    rles = [{"size": [height, width], "counts": _as_bytes(c)} for c in counts]
    return mask_utils.decode(rles).transpose(2, 0, 1)  # [H, W, N] -> [N, H, W]


def rle_area_and_box(counts: bytes, height: int, width: int) -> tuple[float, np.ndarray]:
    """Pixel area and tight box of an RLE mask.

    Returns:
      (area, box): box [4] float32 xyxy (pixel edges), zeros if the mask is empty.
    """
    rle = {"size": [height, width], "counts": counts}
    area = float(mask_utils.area(rle))
    x, y, w, h = mask_utils.toBbox(rle)
    return area, np.array([x, y, x + w, y + h], np.float32)


def rle_to_coco_json(counts: bytes, height: int, width: int) -> dict[str, Any]:
    """The JSON-serialisable COCO form of compressed RLE counts."""
    return {"size": [int(height), int(width)], "counts": _as_bytes(counts).decode("ascii")}


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
