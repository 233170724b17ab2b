"""Flax linen modules of Mask R-CNN (NHWC) and the model config."""

from maskrcnn_jax.modeling.config import get_model_config
from maskrcnn_jax.modeling.mask_rcnn import MaskRCNN, anchors_for, init_model
from maskrcnn_jax.modeling.rpn import propose

__all__ = ["MaskRCNN", "anchors_for", "get_model_config", "init_model", "propose"]
