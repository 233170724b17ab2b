"""Host-side (numpy) processing around the device call: resize, buckets, paste.

The path of an image through a predictor is: validate -> resize like
torchvision's ``GeneralizedRCNNTransform`` (scale = min(min_size / short,
max_size / long), bilinear, align_corners=False, no antialias) -> pad into a
bucket (a few fixed sizes, multiples of ``size_divisible``, so that a stream
of differently sized images compiles a handful of times) -> batch -> *device
call* -> boxes back to original pixels and masks pasted into the original
image (torchvision's ``resize_boxes`` / ``paste_masks_in_image``).

Everything here is numpy (and the standard library): no Flax, no JAX, so
that both ``inference.Predictor`` (Flax model, jitted) and
``serving.ExportedPredictor`` (a ``jax.export`` artifact, no Flax) share one
implementation. :class:`BucketedPredictor` is that shared loop; a subclass
only supplies :meth:`BucketedPredictor.run_batch`.

:func:`resize_boxes` and :func:`paste_masks`: each 28x28 mask, zero-padded by
one pixel, is bilinearly resized into its box (expanded by (M + 2) / M and
truncated to integers) and written into an empty image. Bilinear resizing is
separable, so the resized mask is ``Wy @ padded_mask @ Wx.T`` with cached
interpolation matrices, computed only over the visible part of the box.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------
# Resize and buckets
# ---------------------------------------------------------------------------


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of torchvision's resize (``F.interpolate(scale_factor=...,
    recompute_scale_factor=True)``): ``floor(side * scale)`` in float64."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


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


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize, equal to ``F.interpolate(mode="bilinear", align_corners=False)``.

    Args:
      image: [H, W, C] any real dtype.
      size: (h, w) output size.

    Returns:
      [h, w, C] float32 (no antialiasing: the same sampling positions and
      weights as torch, separable).
    """
    img = np.asarray(image, np.float32)
    y0, y1, fy = linear_weights(img.shape[0], int(size[0]))
    x0, x1, fx = linear_weights(img.shape[1], int(size[1]))
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]  # [h, W, C]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def ceil_to(x: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``x``."""
    return int(math.ceil(x / multiple) * multiple)


def default_buckets(
    min_size: int, max_size: int, size_divisible: int = 32
) -> list[tuple[int, int]]:
    """Padded input sizes (H, W) that cover every resized image.

    A resized image has short side <= min_size and long side <= max_size;
    buckets keep the short side at ``ceil(min_size)`` and offer long sides for
    aspect ratios 1, 4:3, 3:2 and the maximum, in both orientations (at most
    7 sizes, so at most 7 compilations per batch size).
    """
    short = ceil_to(min_size, size_divisible)
    long_max = max(ceil_to(max_size, size_divisible), short)
    longs = {min(ceil_to(min_size * r, size_divisible), long_max) for r in (1.0, 4 / 3, 1.5)}
    longs = sorted(longs | {long_max})
    buckets = [(short, s) for s in longs] + [(s, short) for s in longs if s != short]
    return sorted(buckets, key=lambda hw: hw[0] * hw[1])


def check_buckets(
    buckets: Sequence[Sequence[int]] | str | None,
    min_size: int,
    max_size: int,
    size_divisible: int,
) -> list[tuple[int, int]] | str:
    """Buckets sorted by area (``None``: :func:`default_buckets`; ``"exact"`` as is).

    Raises:
      ValueError: a bucket that is not a multiple of ``size_divisible``.
    """
    if buckets is None:
        buckets = default_buckets(min_size, max_size, size_divisible)
    if isinstance(buckets, str):
        if buckets != "exact":
            raise ValueError(f"buckets must be a list of (H, W), None or 'exact', got {buckets!r}")
        return buckets
    out = []
    for h, w in buckets:
        if h % size_divisible or w % size_divisible:
            raise ValueError(f"bucket {(h, w)} is not a multiple of {size_divisible}")
        out.append((int(h), int(w)))
    return sorted(sorted(out), key=lambda hw: hw[0] * hw[1])


def validate_image(image: Any, index: int = 0) -> np.ndarray:
    """Checks one input image; raises ``ValueError`` naming the problem."""
    if not isinstance(image, np.ndarray):
        raise ValueError(  # noqa: TRY004 (callers catch ValueError for bad input)
            f"image {index}: expected a numpy array, got {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: expected dtype uint8 (0..255 RGB), got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {index}: expected shape [H, W, 3] (RGB), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {index}: empty image of shape {image.shape}")
    return image


# ---------------------------------------------------------------------------
# Back to original pixels
# ---------------------------------------------------------------------------


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


def postprocess_detections(
    out: dict[str, np.ndarray],
    resized: Sequence[int],
    original: Sequence[int],
    threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """One image's padded device output -> torchvision-format detections.

    Args:
      out: ``boxes [D, 4]`` xyxy resized pixels, ``scores [D]``, ``labels [D]``,
        ``masks [D, M, M]`` box-frame probabilities, ``valid [D]`` bool.
      resized: (h, w) the image was resized to.
      original: (H, W) of the original image.
      threshold: masks as ``probability > threshold`` bool if given.

    Returns:
      ``boxes [N, 4]`` float32 original pixels, ``scores [N]`` float32,
      ``labels [N]`` int64, ``masks [N, H, W]`` (N = valid slots).
    """
    keep = np.asarray(out["valid"], bool)
    boxes = resize_boxes(out["boxes"][keep], resized, original)
    masks = paste_masks(out["masks"][keep], boxes, original, threshold=threshold)
    return {
        "boxes": boxes,
        "scores": np.asarray(out["scores"][keep], np.float32),
        "labels": np.asarray(out["labels"][keep], np.int64),
        "masks": masks,
    }


# ---------------------------------------------------------------------------
# The shared predictor loop
# ---------------------------------------------------------------------------


class BucketedPredictor:
    """Images in, torchvision-format detections out; the device call is a subclass's.

    Subclasses implement :meth:`run_batch` (``images [B, H, W, 3]`` float32
    0..255 padded into one bucket, ``image_sizes [B, 2]`` int32 -> dict of
    ``[B, D, ...]`` numpy arrays as ``MaskRCNN.__call__`` returns them).

    Args:
      min_size, max_size: torchvision's resize limits.
      size_divisible: the padding multiple.
      buckets: padded (H, W) sizes, multiples of ``size_divisible``; ``None``:
        :func:`default_buckets`; ``"exact"``: pad each image only to a
        multiple of ``size_divisible``.
      batch_size: images per device call (short batches are padded).
      mask_threshold: if set, masks come back as ``probability > threshold`` bool.
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        size_divisible: int,
        buckets: Sequence[Sequence[int]] | str | None = None,
        batch_size: int = 1,
        mask_threshold: float | None = None,
    ):
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.buckets = check_buckets(buckets, self.min_size, self.max_size, self.size_divisible)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mask_threshold = mask_threshold

    # Per-image output -> detections (kept under this name for existing callers).
    _postprocess = staticmethod(postprocess_detections)

    def run_batch(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """One device call on padded images [B, H, W, 3] float32 0..255 and sizes [B, 2]."""
        raise NotImplementedError

    def bucket_for(self, size: Sequence[int]) -> tuple[int, int]:
        """Smallest bucket holding a resized image of ``size`` (h, w)."""
        h, w = int(size[0]), int(size[1])
        d = self.size_divisible
        if self.buckets == "exact":
            return ceil_to(h, d), ceil_to(w, d)
        for bh, bw in self.buckets:
            if h <= bh and w <= bw:
                return bh, bw
        raise ValueError(f"resized image {(h, w)} fits no bucket of {self.buckets}")

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Resized float32 image [h, w, 3] (0..255) and its size (h, w)."""
        size = resized_size(image.shape[0], image.shape[1], self.min_size, self.max_size)
        return resize_image(image, size), size

    def __call__(
        self, images: Sequence[np.ndarray], mask_threshold: float | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Detections of each image, in torchvision's output format.

        Args:
          images: list of [H, W, 3] uint8 RGB arrays (any sizes).
          mask_threshold: overrides the constructor's ``mask_threshold``.

        Returns:
          One dict per image: ``boxes`` [N, 4] float32 xyxy original pixels,
          ``scores`` [N] float32 (descending), ``labels`` [N] int64,
          ``masks`` [N, H, W] float32 probabilities (bool if thresholded).
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError("images must be a list of [H, W, 3] arrays, got a single array")
        images = [validate_image(im, i) for i, im in enumerate(images)]
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        prepared = [self.preprocess(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, size) in enumerate(prepared):
            groups.setdefault(self.bucket_for(size), []).append(i)
        results: list[dict[str, np.ndarray] | None] = [None] * len(images)
        for (bh, bw), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.zeros((self.batch_size, bh, bw, 3), np.float32)
                sizes = np.full((self.batch_size, 2), 32, np.int32)  # padding entries: any size
                for slot, i in enumerate(chunk):
                    resized, (h, w) = prepared[i]
                    batch[slot, :h, :w] = resized
                    sizes[slot] = (h, w)
                out = self.run_batch(batch, sizes)
                for slot, i in enumerate(chunk):
                    results[i] = postprocess_detections(
                        {k: np.asarray(v[slot]) for k, v in out.items()},
                        tuple(sizes[slot]),
                        images[i].shape[:2],
                        threshold,
                    )
        return results  # type: ignore[return-value]
