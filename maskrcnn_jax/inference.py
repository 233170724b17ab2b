"""Predictor: images in, torchvision-format detections out.

The host side (resize, padding into buckets, batching, boxes back to original
pixels, mask pasting) is :class:`maskrcnn_jax.host_processing.BucketedPredictor`,
shared with ``serving.ExportedPredictor``. The device side here is one jitted
:class:`~maskrcnn_jax.modeling.MaskRCNN` call per batch::

    predictor = Predictor.from_checkpoint("runs/coco")
    [result] = predictor([image])  # image: HxWx3 uint8 RGB
    result["boxes"], result["scores"], result["labels"], result["masks"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import xla_options
from maskrcnn_jax.host_processing import (
    BucketedPredictor,
    default_buckets,
    resize_image,
    resized_size,
    validate_image,
)
from maskrcnn_jax.modeling import MaskRCNN

# Re-exported: their home is host_processing.
__all__ = [
    "Predictor",
    "default_buckets",
    "resize_image",
    "resized_size",
    "validate_image",
]


class Predictor(BucketedPredictor):
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
        c = model_config
        super().__init__(
            c.min_size, c.max_size, c.size_divisible, buckets, batch_size, mask_threshold
        )
        self.config = model_config
        self.model = MaskRCNN(model_config)
        self.variables = jax.device_put(variables)
        self._forward = xla_options.jit(self.model.apply)

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

    def run_batch(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """One device call on padded images [B, H, W, 3] float32 0..255 and sizes [B, 2]."""
        out = self._forward(
            self.variables, jnp.asarray(images), jnp.asarray(image_sizes, jnp.int32)
        )
        return jax.device_get(out)
