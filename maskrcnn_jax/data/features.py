"""The stored example: tfds features shared by the COCO and shapes builders.

Only ``tfds.features.Tensor`` features are used: they encode and decode
without TensorFlow (``tfds.features.Image`` needs it), so images are stored as
their encoded bytes and decoded with PIL in the input pipeline.

Stored example (N objects, any N >= 0)::

    image      bytes     encoded JPEG/PNG as read (any mode; decoded to RGB)
    image_id   int64     the source's image id
    file_name  str       file name relative to the image folder
    height     int32     image height (pixels)
    width      int32     image width
    objects/id        [N] int64     annotation id
    objects/bbox      [N, 4] float32 xyxy, original image pixels, clipped to it
    objects/label     [N] int32     contiguous class 1..K
    objects/is_crowd  [N] bool
    objects/area      [N] float32   COCO area (mask pixels unless given)
    objects/mask      [N] bytes     compressed COCO RLE of the [height, width] mask
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds


def example_features() -> tfds.features.FeaturesDict:
    """The FeaturesDict of a stored example (see the module docstring)."""
    t = tfds.features.Tensor
    return tfds.features.FeaturesDict(
        {
            "image": t(shape=(), dtype=np.object_),
            "image_id": t(shape=(), dtype=np.int64),
            "file_name": t(shape=(), dtype=np.str_),
            "height": t(shape=(), dtype=np.int32),
            "width": t(shape=(), dtype=np.int32),
            "objects": tfds.features.Sequence(
                {
                    "id": t(shape=(), dtype=np.int64),
                    "bbox": t(shape=(4,), dtype=np.float32),
                    "label": t(shape=(), dtype=np.int32),
                    "is_crowd": t(shape=(), dtype=np.bool_),
                    "area": t(shape=(), dtype=np.float32),
                    "mask": t(shape=(), dtype=np.object_),
                }
            ),
        }
    )


def make_example(
    image: bytes,
    image_id: int,
    file_name: str,
    height: int,
    width: int,
    ids: Sequence[int],
    boxes: np.ndarray,
    labels: Sequence[int],
    is_crowd: Sequence[bool],
    areas: Sequence[float],
    masks: Sequence[bytes],
) -> dict[str, Any]:
    """Assembles a stored example.

    Args:
      image: encoded image bytes.
      image_id: image id.
      file_name: file name.
      height: image height.
      width: image width.
      ids: [N] annotation ids.
      boxes: [N, 4] xyxy in image pixels.
      labels: [N] contiguous labels 1..K.
      is_crowd: [N].
      areas: [N].
      masks: [N] compressed RLE counts.
    """
    n = len(ids)
    boxes = np.asarray(boxes, np.float32).reshape(n, 4)
    return {
        "image": image,
        "image_id": int(image_id),
        "file_name": file_name,
        "height": int(height),
        "width": int(width),
        "objects": {
            "id": np.asarray(ids, np.int64).reshape(n),
            "bbox": boxes,
            "label": np.asarray(labels, np.int32).reshape(n),
            "is_crowd": np.asarray(is_crowd, np.bool_).reshape(n),
            "area": np.asarray(areas, np.float32).reshape(n),
            "mask": [bytes(m) for m in masks],
        },
    }


def objects_as_arrays(example: dict[str, Any]) -> dict[str, Any]:
    """A decoded example's objects as arrays with their static trailing shapes.

    ``tfds.data_source`` returns sequences as Python lists (``[]`` when empty);
    this gives ``bbox [N, 4] float32``, ``label [N] int32``, ``is_crowd [N]
    bool``, ``id [N] int64``, ``area [N] float32`` and ``mask`` a list of N bytes.
    """
    obj = example["objects"]
    n = len(obj["label"])
    return {
        "id": np.asarray(obj["id"], np.int64).reshape(n),
        "bbox": np.asarray(obj["bbox"], np.float32).reshape(n, 4),
        "label": np.asarray(obj["label"], np.int32).reshape(n),
        "is_crowd": np.asarray(obj["is_crowd"], np.bool_).reshape(n),
        "area": np.asarray(obj["area"], np.float32).reshape(n),
        "mask": list(obj["mask"]),
    }
