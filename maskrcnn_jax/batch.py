"""The input batch: its keys, shapes, dtypes and padding values, defined once.

The input pipeline (``data/``) produces these arrays, the train step reads
``TRAIN_KEYS`` of them, and tests and benchmarks build stand-ins with
:func:`zeros_batch`. Only numpy is imported here, so code that needs the
layout (a device check, a benchmark) does not pull in the data stack
(tensorflow-datasets, grain).

One example (M = max_instances, S = mask_size, [H, W] = padded image size)::

    image          [H, W, 3] uint8 (or float32) RGB 0..255, un-normalised;
                   zero outside the resized image (top-left [0:h, 0:w])
    image_size     [2] int32 (h, w) of the resized image inside the padding
    boxes          [M, 4] float32 xyxy, network-input pixels; 0 in padding slots
    labels         [M] int32 1..K; 0 in padding slots
    masks          [M, S, S] uint8 {0, 1}, each instance's mask cropped to its box
    is_crowd       [M] bool; False in padding slots
    valid          [M] bool, True for real instances (crowd included)
    image_id       () int32 the source's image id; -1 for an empty example
    original_size  [2] int32 (h, w) of the source image
    scale          () float32 resize factor (resized / source)
    valid_image    () bool, False for an empty (padding) example
    num_truncated  () int32 instances dropped because more than M survived

A batch stacks B examples on a leading axis (``image [B, H, W, 3]`` ...). The
first seven keys are what training reads (``TRAIN_KEYS``); the rest are for
the host (bookkeeping, logging, evaluation of a batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

IMAGE_DTYPES = ("uint8", "float32")


class FieldSpec(NamedTuple):
    """Shape and dtype of one batch entry (a ``(shape, dtype)`` pair)."""

    shape: tuple[int, ...]
    dtype: np.dtype


# The keys the train step reads: the model input and the ground truth.
TRAIN_KEYS = ("image", "image_size", "boxes", "labels", "masks", "is_crowd", "valid")
# Host-side bookkeeping carried along with each example.
HOST_KEYS = ("image_id", "original_size", "scale", "valid_image", "num_truncated")
# Every key of a batch, in this order.
BATCH_KEYS = TRAIN_KEYS + HOST_KEYS

# Fill values of an empty example where they are not zero / False.
_PAD_VALUES = {"image_id": -1, "scale": 1.0}


def example_spec(
    image_size: Sequence[int],
    max_instances: int,
    mask_size: int,
    image_dtype: str = "uint8",
) -> dict[str, FieldSpec]:
    """Shapes and dtypes of one example, by key (``BATCH_KEYS`` order).

    Args:
      image_size: (H, W), the padded network input.
      max_instances: M, instance slots per image.
      mask_size: S, side of the box-cropped instance masks.
      image_dtype: ``'uint8'`` or ``'float32'``.

    Returns:
      ``{key: FieldSpec(shape, dtype)}`` as in the module docstring.

    Raises:
      ValueError: naming a bad size or dtype.
    """
    h, w = (int(v) for v in image_size)
    m, s = int(max_instances), int(mask_size)
    if min(h, w, m, s) < 1:
        raise ValueError(
            f"batch spec needs positive sizes: image_size={tuple(image_size)}, "
            f"max_instances={max_instances}, mask_size={mask_size}"
        )
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
    i32, f32, b = np.dtype(np.int32), np.dtype(np.float32), np.dtype(bool)
    spec = {
        "image": FieldSpec((h, w, 3), np.dtype(image_dtype)),
        "image_size": FieldSpec((2,), i32),
        "boxes": FieldSpec((m, 4), f32),
        "labels": FieldSpec((m,), i32),
        "masks": FieldSpec((m, s, s), np.dtype(np.uint8)),
        "is_crowd": FieldSpec((m,), b),
        "valid": FieldSpec((m,), b),
        "image_id": FieldSpec((), i32),
        "original_size": FieldSpec((2,), i32),
        "scale": FieldSpec((), f32),
        "valid_image": FieldSpec((), b),
        "num_truncated": FieldSpec((), i32),
    }
    return spec


def batch_spec(
    batch_size: int,
    image_size: Sequence[int],
    max_instances: int,
    mask_size: int,
    image_dtype: str = "uint8",
) -> dict[str, FieldSpec]:
    """Shapes and dtypes of a batch of ``batch_size`` examples (leading axis B).

    Args:
      batch_size: B, examples in the batch (per process for the input pipeline).
      image_size: (H, W).
      max_instances: M.
      mask_size: S.
      image_dtype: ``'uint8'`` or ``'float32'``.

    Returns:
      ``{key: FieldSpec((B, *example_shape), dtype)}``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return {
        k: FieldSpec((int(batch_size), *f.shape), f.dtype)
        for k, f in example_spec(image_size, max_instances, mask_size, image_dtype).items()
    }


def _filled(spec: dict[str, FieldSpec]) -> dict[str, np.ndarray]:
    return {k: np.full(f.shape, _PAD_VALUES.get(k, 0), f.dtype) for k, f in spec.items()}


def empty_example(
    image_size: Sequence[int],
    max_instances: int,
    mask_size: int,
    image_dtype: str = "uint8",
) -> dict[str, np.ndarray]:
    """An all-padding example: zeros, nothing valid, ``image_id`` -1, ``scale`` 1.

    Fresh, writable arrays of :func:`example_spec`'s shapes (preprocessing
    fills one in place).
    """
    return _filled(example_spec(image_size, max_instances, mask_size, image_dtype))


def zeros_batch(
    batch_size: int,
    image_size: Sequence[int],
    max_instances: int,
    mask_size: int,
    image_dtype: str = "uint8",
    keys: Sequence[str] = BATCH_KEYS,
) -> dict[str, np.ndarray]:
    """A batch of ``batch_size`` empty examples, restricted to ``keys``.

    Args:
      batch_size: B.
      image_size: (H, W).
      max_instances: M.
      mask_size: S.
      image_dtype: ``'uint8'`` or ``'float32'``.
      keys: which entries, e.g. ``TRAIN_KEYS`` for a train-step input.

    Returns:
      ``{key: [B, ...] array}`` filled as :func:`empty_example`.

    Raises:
      ValueError: naming an unknown key.
    """
    unknown = [k for k in keys if k not in BATCH_KEYS]
    if unknown:
        raise ValueError(f"unknown batch keys {unknown}; known: {BATCH_KEYS}")
    spec = batch_spec(batch_size, image_size, max_instances, mask_size, image_dtype)
    return _filled({k: spec[k] for k in keys})
