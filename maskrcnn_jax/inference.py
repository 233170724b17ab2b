"""Predictor: images in, torchvision-format detections out.

Host side, per image: resize like torchvision's ``GeneralizedRCNNTransform``
(scale = min(min_size / short, max_size / long), bilinear, align_corners=False,
no antialias), pad into a bucket (a few fixed sizes, multiples of 32, so a
stream of differently sized images compiles a handful of times), batch.
Device side: one jitted :class:`~maskrcnn_jax.modeling.MaskRCNN` call per
batch. Host side again: boxes back to original pixels and masks pasted into
the original image (``paste_masks_in_image`` semantics)::

    predictor = Predictor.from_checkpoint("runs/coco")
    [result] = predictor([image])  # image: HxWx3 uint8 RGB
    result["boxes"], result["scores"], result["labels"], result["masks"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax.modeling import MaskRCNN
from maskrcnn_jax.modeling.postprocess import linear_weights, paste_masks, resize_boxes


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of torchvision's resize (``F.interpolate(scale_factor=...,
    recompute_scale_factor=True)``): ``floor(side * scale)`` in float64."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


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


def _ceil_to(x: float, multiple: int) -> int:
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
    short = _ceil_to(min_size, size_divisible)
    long_max = max(_ceil_to(max_size, size_divisible), short)
    longs = {min(_ceil_to(min_size * r, size_divisible), long_max) for r in (1.0, 4 / 3, 1.5)}
    longs = sorted(longs | {long_max})
    buckets = [(short, s) for s in longs] + [(s, short) for s in longs if s != short]
    return sorted(buckets, key=lambda hw: hw[0] * hw[1])


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


class Predictor:
    """Batched, jitted Mask R-CNN inference on numpy images.

    Args:
      variables: ``{"params": ..., "constants": ...}``.
      model_config: the model's config.
      buckets: padded (H, W) sizes, multiples of ``size_divisible``; ``None``:
        :func:`default_buckets`; ``"exact"``: pad each image only to a
        multiple of ``size_divisible`` (torchvision's padding for a batch of
        one; one compilation per distinct size).
      batch_size: images per device call (short batches are padded), fixed
        so that the batch dimension never triggers a recompilation.
      mask_threshold: if set, masks are returned as ``probability >
        threshold`` bool arrays instead of float probabilities.
    """

    def __init__(
        self,
        variables: Any,
        model_config: ml_collections.ConfigDict,
        buckets: Sequence[tuple[int, int]] | str | None = None,
        batch_size: int = 1,
        mask_threshold: float | None = None,
    ):
        self.config = model_config
        self.model = MaskRCNN(model_config)
        self.variables = jax.device_put(variables)
        self.batch_size = int(batch_size)
        self.mask_threshold = mask_threshold
        c = model_config
        if buckets is None:
            buckets = default_buckets(c.min_size, c.max_size, c.size_divisible)
        if buckets != "exact":
            for h, w in buckets:
                if h % c.size_divisible or w % c.size_divisible:
                    raise ValueError(f"bucket {(h, w)} is not a multiple of {c.size_divisible}")
            buckets = sorted((int(h), int(w)) for h, w in buckets)
            buckets.sort(key=lambda hw: hw[0] * hw[1])
        self.buckets = buckets
        self._forward = jax.jit(self.model.apply)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs: Any) -> Predictor:
        """Loads variables and config with :func:`maskrcnn_jax.checkpoint.load_model`."""
        from maskrcnn_jax.checkpoint import load_model

        variables, config = load_model(path)
        return cls(variables, config, **kwargs)

    @property
    def model_config(self) -> ml_collections.ConfigDict:
        """The model config (same as ``config``)."""
        return self.config

    @property
    def num_compilations(self) -> int:
        """Distinct input shapes compiled so far."""
        return self._forward._cache_size()

    def bucket_for(self, size: Sequence[int]) -> tuple[int, int]:
        """Smallest bucket holding a resized image of ``size`` (h, w)."""
        h, w = int(size[0]), int(size[1])
        d = self.config.size_divisible
        if self.buckets == "exact":
            return _ceil_to(h, d), _ceil_to(w, d)
        for bh, bw in self.buckets:
            if h <= bh and w <= bw:
                return bh, bw
        raise ValueError(f"resized image {(h, w)} fits no bucket of {self.buckets}")

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Resized float32 image [h, w, 3] (0..255) and its size (h, w)."""
        size = resized_size(
            image.shape[0], image.shape[1], self.config.min_size, self.config.max_size
        )
        return resize_image(image, size), size

    def run_batch(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """One device call on padded images [B, H, W, 3] float32 0..255 and sizes [B, 2]."""
        out = self._forward(
            self.variables, jnp.asarray(images), jnp.asarray(image_sizes, jnp.int32)
        )
        return jax.device_get(out)

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
                    results[i] = self._postprocess(
                        {k: v[slot] for k, v in out.items()},
                        tuple(sizes[slot]),
                        images[i].shape[:2],
                        threshold,
                    )
        return results  # type: ignore[return-value]

    @staticmethod
    def _postprocess(out, resized, original, threshold) -> dict[str, np.ndarray]:
        keep = np.asarray(out["valid"], bool)
        boxes = resize_boxes(out["boxes"][keep], resized, original)
        masks = paste_masks(out["masks"][keep], boxes, original, threshold=threshold)
        return {
            "boxes": boxes,
            "scores": np.asarray(out["scores"][keep], np.float32),
            "labels": np.asarray(out["labels"][keep], np.int64),
            "masks": masks,
        }
