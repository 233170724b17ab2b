"""Pure jnp geometric ops: no Flax, no state.

Modules, in the order of the data flow: ``boxes`` (area, IoU, box coding),
``anchors`` (anchors and ``FPN_STRIDES``), ``nms``, ``roi_geometry`` (RoI
sample points, taps and weights), the RoI pooling implementations
(``roi_align``: vmap reference, ``roi_align_pallas``: fused kernel,
``roi_align_einsum``: gather-free; ``roi_pool``: RoIPool) and ``poolers``
(level assignment, ``roi_align`` / ``multilevel_roi_align`` and the ``impl``
registry, ``multilevel_roi_pool``, and ``multilevel_roi_pooler``, which runs
the model config's ``roi_pooler``: align, align_v2 or pool). The import
graph is acyclic: each implementation imports at most ``roi_geometry``, and
only ``poolers`` imports the implementations.
"""

from maskrcnn_jax.ops.anchors import FPN_STRIDES, generate_anchors, num_anchors_per_level
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
from maskrcnn_jax.ops.poolers import (
    ROI_ALIGN_IMPLS,
    ROI_POOLERS,
    RoIAlignLevels,
    assign_levels,
    get_roi_align_levels,
    multilevel_roi_align,
    multilevel_roi_pool,
    multilevel_roi_pooler,
    resolve_roi_align_impl,
    roi_align,
    roi_align_impl_names,
)
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.ops.roi_geometry import flatten_levels
from maskrcnn_jax.ops.roi_pool import roi_pool, roi_pool_levels

__all__ = [
    "BBOX_XFORM_CLIP",
    "FPN_STRIDES",
    "ROI_ALIGN_IMPLS",
    "ROI_BOX_WEIGHTS",
    "ROI_POOLERS",
    "RPN_BOX_WEIGHTS",
    "RoIAlignLevels",
    "assign_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "flatten_levels",
    "generate_anchors",
    "get_roi_align_levels",
    "multilevel_roi_align",
    "multilevel_roi_pool",
    "multilevel_roi_pooler",
    "nms",
    "num_anchors_per_level",
    "resolve_roi_align_impl",
    "roi_align",
    "roi_align_impl_names",
    "roi_align_levels",
    "roi_pool",
    "roi_pool_levels",
]
