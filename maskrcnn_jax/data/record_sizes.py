"""Per-record image sizes and instance counts of a prepared split, read once and cached.

The aspect-ratio grouping of the input pipeline needs every training image's
orientation before it reads a batch, and grouping must not decode images at
start-up (118k for COCO 2017). The stored example carries ``height`` and
``width`` (``features.py``), but tfds writes records in a hashed order, so the
sizes are not known by record index until the split is read. They are read
once (records parsed, images not decoded) and kept beside the prepared files
as ``record_sizes-<split>.npy``, ``[N, 3] int32`` in data-source order:
height, width and the number of non-crowd instances (the records that
``drop_empty_images`` drops have 0). Later runs load that file.

Writing is atomic (a temporary file renamed into place), so processes that
compute it at the same time each leave a complete, identical file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np

from maskrcnn_jax.data.datasets import PreparedDataset

logger = logging.getLogger(__name__)

_CHUNK = 512  # Records read per data-source call.


class RecordSizes(NamedTuple):
    """Per-record metadata of one split, in data-source order.

    Attributes:
      height: [N] int32 source image height.
      width: [N] int32 source image width.
      num_instances: [N] int32 non-crowd instances (0: no training signal).
    """

    height: np.ndarray
    width: np.ndarray
    num_instances: np.ndarray


def record_sizes_path(prepared: PreparedDataset, split: str) -> str:
    """Where :func:`record_sizes` keeps a split's array."""
    return os.path.join(str(prepared.builder.data_dir), f"record_sizes-{split}.npy")


def record_sizes(prepared: PreparedDataset, split: str) -> RecordSizes:
    """The split's :class:`RecordSizes`, from the cache file or read once and cached.

    Args:
      prepared: a prepared dataset.
      split: one of ``prepared.splits``.

    Returns:
      Arrays of ``len(prepared.data_source(split))`` entries each.
    """
    source = prepared.data_source(split)
    n = len(source)
    path = record_sizes_path(prepared, split)
    table = _load(path, n)
    if table is None:
        table = _read_sizes(source, split)
        try:
            _save_atomically(path, table)
        except OSError as e:  # A read-only prepared dataset: read it again next time.
            logger.warning("could not cache the record sizes in %s: %s", path, e)
    return RecordSizes(table[:, 0], table[:, 1], table[:, 2])


def _load(path: str, n: int) -> np.ndarray | None:
    """The cached [n, 3] table, or None if missing or not of this split (then re-read)."""
    if not os.path.exists(path):
        return None
    table = np.load(path)
    if table.shape != (n, 3) or table.dtype != np.int32:
        logger.warning(
            "%s holds %s %s, expected (%d, 3) int32; reading the split again",
            path,
            table.shape,
            table.dtype,
            n,
        )
        return None
    return table


def _read_sizes(source: Any, split: str) -> np.ndarray:
    n = len(source)
    logger.info(
        "reading the %d %s records once for their image sizes (no image decoding)", n, split
    )
    t0 = time.monotonic()
    table = np.zeros((n, 3), np.int32)
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(start + _CHUNK, n)))
        for i, example in zip(keys, source.__getitems__(keys)):
            crowd = np.asarray(example["objects"]["is_crowd"], bool).reshape(-1)
            table[i] = (int(example["height"]), int(example["width"]), int((~crowd).sum()))
    logger.info("read %d %s record sizes in %.1f s", n, split, time.monotonic() - t0)
    return table


def _save_atomically(path: str, table: np.ndarray) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".record_sizes-", suffix=".npy", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
