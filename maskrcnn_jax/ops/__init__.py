"""Pure jnp geometric ops: no Flax, no state."""

from maskrcnn_jax.ops.anchors import generate_anchors, num_anchors_per_level
from maskrcnn_jax.ops.boxes import (
    BBOX_XFORM_CLIP,
    ROI_BOX_WEIGHTS,
    RPN_BOX_WEIGHTS,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
)
from maskrcnn_jax.ops.nms import batched_nms, nms
from maskrcnn_jax.ops.roi_align import (
    assign_levels,
    flatten_levels,
    multilevel_roi_align,
    roi_align,
    roi_align_levels,
)

__all__ = [
    "BBOX_XFORM_CLIP",
    "ROI_BOX_WEIGHTS",
    "RPN_BOX_WEIGHTS",
    "assign_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "flatten_levels",
    "generate_anchors",
    "multilevel_roi_align",
    "nms",
    "num_anchors_per_level",
    "roi_align",
    "roi_align_levels",
]
