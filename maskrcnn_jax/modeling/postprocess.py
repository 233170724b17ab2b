"""Host-side post-processing to original-image coordinates (numpy).

Moved to :mod:`maskrcnn_jax.host_processing` (no Flax there, so that the
serving path can use it); these names stay importable from here.
"""

from maskrcnn_jax.host_processing import (
    interpolation_matrix,
    linear_weights,
    paste_masks,
    resize_boxes,
)

__all__ = ["interpolation_matrix", "linear_weights", "paste_masks", "resize_boxes"]
