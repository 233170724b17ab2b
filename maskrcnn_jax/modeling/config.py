"""Model config: torchvision's ``maskrcnn_resnet50_fpn`` defaults.

Every field is a JSON scalar or list so that ``config.to_json()`` round-trips
(checkpoints record the config). Sequences may come back from JSON as lists;
the model reads them through ``tuple(...)``.

Usage::

    from maskrcnn_jax.modeling import get_model_config
    config = get_model_config(depth=18, backbone_width=16, num_classes=4)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from maskrcnn_jax.losses import MASK_LOSSES
from maskrcnn_jax.ops.poolers import ROI_POOLERS, roi_align_impl_names

NORMS = ("frozen_bn", "gn")
HEAD_NORMS = ("none", "gn")
DEPTHS = (18, 34, 50, 101)
DTYPES = ("float32", "bfloat16")


def get_model_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Mask R-CNN ResNet-FPN config with torchvision's defaults.

    Args:
      **overrides: fields to replace; unknown names raise ``KeyError``.

    Returns:
      A ``ConfigDict`` with these fields:

      - ``num_classes``: classes including background (COCO: 91).
      - ``depth``: ResNet depth, 18/34 (basic blocks) or 50/101 (bottlenecks).
      - ``norm``: backbone normalisation, ``"frozen_bn"`` (constants collection,
        never trained) or ``"gn"`` (GroupNorm, 32 groups, trainable).
      - ``freeze_at``: number of backbone stages whose output is wrapped in
        ``stop_gradient`` (1 = stem, 2 = stem + layer1 as torchvision's
        ``trainable_layers=3``; 0 = train everything).
      - ``backbone_width``: stem width (64 in ResNets; smaller for tiny models).
      - ``fpn_channels``: FPN / head channels.
      - ``head_norm``: ``"none"`` or ``"gn"`` in FPN, RPN conv and mask head.
      - ``anchor_sizes``: one anchor size per level P2..P6.
      - ``aspect_ratios``: height / width ratios shared by all levels.
      - ``rpn_*``: proposal settings (top-n before/after NMS per image for
        test and train, NMS IoU, minimum side, score threshold on sigmoid).
      - ``box_score_thresh``, ``box_nms_thresh``, ``box_min_size``,
        ``detections_per_img``: torchvision's ``RoIHeads`` post-processing.
      - ``box_candidates``: static cap on the (proposal, class) candidates that
        enter class-aware NMS. torchvision runs NMS on every candidate with
        score > ``box_score_thresh``; here the ``box_candidates`` best of them
        do (same result unless more than this many pass the threshold, which a
        trained model does not do in practice).
      - ``representation_size``: box head FC width.
      - ``mask_head_dim``: mask head conv width.
      - ``box_roi_size``, ``mask_roi_size``, ``sampling_ratio``: RoIAlign.
      - ``min_size``, ``max_size``, ``image_mean``, ``image_std``,
        ``size_divisible``: input transform (images are 0..255 RGB).
      - ``dtype``: compute dtype (params stay float32).
      - ``roi_align_impl``: one of ``maskrcnn_jax.ops.roi_align_impl_names()``:
        ``"reference"``, ``"pallas"``, ``"einsum"`` or ``"auto"`` (see
        ``maskrcnn_jax.ops.poolers.resolve_roi_align_impl``); it chooses the
        implementation of the align poolers only.
      - ``roi_pooler``: how the box and mask heads pool their RoI features
        (``maskrcnn_jax.ops.ROI_POOLERS``): ``"align"`` (torchvision's
        RoIAlign, ``aligned=False``), ``"align_v2"`` (``aligned=True``,
        Detectron2's ROIAlignV2) or ``"pool"`` (RoIPool, the paper's Table 2
        ablation). Mask targets are RoIAligned whatever the pooler.
      - ``mask_loss``: ``"sigmoid"`` (per-class masks, binary cross-entropy on
        the ground-truth class's channel; inference takes the sigmoid of the
        predicted class's channel) or ``"softmax"`` (a per-pixel softmax over
        the class channels; inference takes the predicted class's softmax
        probability).
      - ``class_agnostic_mask``: one mask channel for every class (sigmoid;
        not with ``mask_loss="softmax"``). Its checkpoints do not load into a
        per-class model, nor the reverse.

      Training (read only by :meth:`MaskRCNN.losses`; torchvision's
      ``MaskRCNN`` constructor arguments of the same names):

      - ``rpn_batch_size_per_image``, ``rpn_positive_fraction``: anchors
        sampled per image for the RPN losses, and the most of them positive.
      - ``roi_batch_size_per_image``, ``roi_positive_fraction``: the same for
        the RoIs of the box head (torchvision's ``box_batch_size_per_image``
        and ``box_positive_fraction``).
      - ``mask_rois_per_image``: mask-head slots per image; 0 = every possible
        positive (``roi_batch_size_per_image * roi_positive_fraction``),
        exact but at the mask head's full cost; a smaller cap trains on a
        uniform random subset of the positives when there are more.
      - ``mask_head_prefixes``: how many static prefixes of its slots the mask
        head may run on, in training and inference (:func:`mask_head_prefix_sizes`:
        4 gives p/8, p/4, p/2 and p). At run time ``lax.switch`` picks the
        shortest that holds every image's positives (training) or
        detections (inference), so its cost follows them as torchvision's
        does. Exact: the slots left out carry no loss and no detection.
        1 = always all slots, with no switch.
      - ``smooth_l1_beta``: smooth-L1 beta of the RPN and box losses (1/9 as
        torchvision; 0 = L1 as Detectron2).
    """
    c = ml_collections.ConfigDict()
    c.num_classes = 91
    # Backbone.
    c.depth = 50
    c.norm = "frozen_bn"
    c.freeze_at = 2
    c.backbone_width = 64
    # FPN and heads.
    c.fpn_channels = 256
    c.head_norm = "none"
    # Anchors / RPN.
    c.anchor_sizes = [32, 64, 128, 256, 512]
    c.aspect_ratios = [0.5, 1.0, 2.0]
    c.rpn_pre_nms_top_n_test = 1000
    c.rpn_post_nms_top_n_test = 1000
    c.rpn_pre_nms_top_n_train = 2000
    c.rpn_post_nms_top_n_train = 2000
    c.rpn_nms_thresh = 0.7
    c.rpn_min_size = 1e-3
    c.rpn_score_thresh = 0.0
    # RoI heads.
    c.box_score_thresh = 0.05
    c.box_nms_thresh = 0.5
    c.box_min_size = 1e-2
    c.detections_per_img = 100
    c.box_candidates = 2000
    c.representation_size = 1024
    c.mask_head_dim = 256
    c.box_roi_size = 7
    c.mask_roi_size = 14
    c.sampling_ratio = 2
    # Input transform.
    c.min_size = 800
    c.max_size = 1333
    c.image_mean = [0.485, 0.456, 0.406]
    c.image_std = [0.229, 0.224, 0.225]
    c.size_divisible = 32
    # Numerics / kernels.
    c.dtype = "float32"
    c.roi_align_impl = "auto"
    c.roi_pooler = "align"
    c.mask_loss = "sigmoid"
    c.class_agnostic_mask = False
    # Training: sampling and losses.
    c.rpn_batch_size_per_image = 256
    c.rpn_positive_fraction = 0.5
    c.roi_batch_size_per_image = 512
    c.roi_positive_fraction = 0.25
    c.mask_rois_per_image = 0
    c.mask_head_prefixes = 4
    c.smooth_l1_beta = 1.0 / 9
    for key, value in overrides.items():
        if key not in c:
            raise KeyError(f"unknown model config field {key!r}")
        c[key] = list(value) if isinstance(value, tuple) else value
    validate_config(c)
    return c


def mask_slots_per_image(c: ml_collections.ConfigDict) -> int:
    """The mask head's static RoI slots per image in training: every possible positive
    (``roi_batch_size_per_image * roi_positive_fraction``), capped by
    ``mask_rois_per_image`` when that is set."""
    p = int(c.roi_batch_size_per_image * c.roi_positive_fraction)
    return min(p, int(c.mask_rois_per_image or p))


def mask_head_prefix_sizes(slots: int, prefixes: int) -> list[int]:
    """The static slot counts the mask head may run on: ``ceil(slots / 2**i)`` for
    ``i < prefixes``, ascending and distinct (``(128, 4)`` -> ``[16, 32, 64, 128]``)."""
    return sorted({-(-slots // 2**i) for i in range(prefixes)})


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first invalid field of ``c``."""
    impls = roi_align_impl_names()
    checks = (
        ("depth", c.depth in DEPTHS, DEPTHS),
        ("norm", c.norm in NORMS, NORMS),
        ("head_norm", c.head_norm in HEAD_NORMS, HEAD_NORMS),
        ("dtype", c.dtype in DTYPES, DTYPES),
        ("roi_align_impl", c.roi_align_impl in impls, impls),
        ("roi_pooler", c.roi_pooler in ROI_POOLERS, ROI_POOLERS),
        ("mask_loss", c.mask_loss in MASK_LOSSES, MASK_LOSSES),
        ("class_agnostic_mask", isinstance(c.class_agnostic_mask, bool), (False, True)),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"model config {name}={c[name]!r}, expected one of {allowed}")
    if c.class_agnostic_mask and c.mask_loss == "softmax":
        raise ValueError(
            "model config mask_loss='softmax' with class_agnostic_mask=True: a softmax over "
            "one mask channel is constant; use mask_loss='sigmoid'"
        )
    if not 0 <= c.freeze_at <= 5:
        raise ValueError(f"model config freeze_at={c.freeze_at}, expected 0..5")
    if c.num_classes < 2:
        raise ValueError(f"model config num_classes={c.num_classes} must count background too")
    if len(c.anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per level P2..P6, got {c.anchor_sizes}")
    if c.size_divisible % 32:
        raise ValueError(f"size_divisible={c.size_divisible} must be a multiple of 32")
    for name in ("rpn_batch_size_per_image", "roi_batch_size_per_image"):
        if c[name] < 1:
            raise ValueError(f"model config {name}={c[name]}, expected >= 1")
    for name in ("rpn_positive_fraction", "roi_positive_fraction"):
        if not 0 < c[name] <= 1:
            raise ValueError(f"model config {name}={c[name]}, expected in (0, 1]")
    if c.mask_rois_per_image < 0:
        raise ValueError(
            f"model config mask_rois_per_image={c.mask_rois_per_image}, expected >= 0 (0 = all)"
        )
    if not (isinstance(c.mask_head_prefixes, int) and c.mask_head_prefixes >= 1):
        raise ValueError(
            f"model config mask_head_prefixes={c.mask_head_prefixes!r}, expected an int >= 1"
        )
    if c.smooth_l1_beta < 0:
        raise ValueError(f"model config smooth_l1_beta={c.smooth_l1_beta}, expected >= 0")
