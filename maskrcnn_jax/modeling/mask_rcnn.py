"""Mask R-CNN with a ResNet-FPN backbone, equal to torchvision's ``maskrcnn_resnet50_fpn``.

Data flow of :meth:`MaskRCNN.__call__` (one jit, static shapes):
normalise -> ResNet C2..C5 -> FPN P2..P6 -> RPN logits/deltas -> proposals
(top-n per level, decode, clip, NMS per level) -> box head -> detections
(per-class decode, softmax, threshold, class-aware NMS) -> mask head on the
detections -> the predicted class's mask probabilities.

The config's ``roi_pooler`` (align / align_v2 / pool) sets how both heads pool
their RoI features; ``mask_loss`` (sigmoid / softmax) and
``class_agnostic_mask`` set the mask channels, their training loss and how
inference turns them into probabilities (``MASK_MODES``).

Training runs :meth:`MaskRCNN.losses`: the same features, RPN and proposals
(``proposals(train=True)``, so every proposal setting, ``rpn_score_thresh``
included, holds in training as in inference), then anchor and RoI sampling
(:mod:`maskrcnn_jax.targets`) and the five losses (:mod:`maskrcnn_jax.losses`)::

    terms = model.apply(variables, images, image_sizes, targets, key, method=MaskRCNN.losses)

The stages are also methods (``features``, ``rpn``, ``proposals``,
``box_head``, ``mask_head``)::

    feats = model.apply(variables, images, image_sizes, method=MaskRCNN.features)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax.losses import (
    box_head_loss,
    class_agnostic_mask_loss,
    mask_loss,
    rpn_loss,
    softmax_mask_loss,
)
from maskrcnn_jax.modeling.box_head import BoxHead, detect
from maskrcnn_jax.modeling.config import mask_head_prefix_sizes, mask_slots_per_image
from maskrcnn_jax.modeling.fpn import FPN
from maskrcnn_jax.modeling.mask_head import MaskHead
from maskrcnn_jax.modeling.resnet import ResNet
from maskrcnn_jax.modeling.rpn import RPNHead, propose
from maskrcnn_jax.ops import FPN_STRIDES, generate_anchors, num_anchors_per_level
from maskrcnn_jax.targets import mask_targets, roi_targets, rpn_targets


def on_shortest_prefix(
    module: nn.Module,
    occupied: jnp.ndarray,
    prefixes: int,
    branch,
    *args,
    remat: bool = False,
):
    """``branch(n)(module, *args)`` for the shortest static prefix n of the slots that
    holds every image's occupied slots, picked at run time.

    The candidates are :func:`~maskrcnn_jax.modeling.config.mask_head_prefix_sizes`
    of the slot count; ``lax.switch`` (``nn.switch``) picks one. With one candidate
    the branch runs directly, with no switch.

    Args:
      module: the module the branch runs on (its ``nn.switch`` scope).
      occupied: [B, S] bool; each row's True slots fill a prefix of it
        (positives in the RoI slots, valid detections).
      prefixes: how many candidate prefixes (``model.mask_head_prefixes``).
      branch: ``n -> fn(module, *args)``, every ``fn`` with the same output
        shapes and dtypes.
      remat: rematerialise each branch (``nn.remat``). For a branch that is
        differentiated: JAX's derivative of a switch returns the residuals of
        every branch from its forward, zero-filled for those not taken.
    """
    sizes = mask_head_prefix_sizes(occupied.shape[1], prefixes)
    if len(sizes) == 1:
        return branch(sizes[0])(module, *args)
    needed = jnp.max(jnp.sum(occupied, axis=1))
    index = jnp.searchsorted(jnp.asarray(sizes), needed)  # first prefix >= needed
    wrap = nn.remat if remat else (lambda fn: fn)
    return nn.switch(index, [wrap(branch(n)) for n in sizes], module, *args)


def anchors_for(config: ml_collections.ConfigDict, image_size: Sequence[int]):
    """Anchors [A, 4] and anchors per level of a padded input (static, numpy).

    Args:
      image_size: (H, W) of the padded network input.
    """
    sizes = tuple((float(s),) for s in config.anchor_sizes)
    ratios = tuple(float(r) for r in config.aspect_ratios)
    size = (int(image_size[0]), int(image_size[1]))
    anchors = generate_anchors(size, FPN_STRIDES, sizes, ratios)
    return anchors, num_anchors_per_level(size, FPN_STRIDES, len(ratios))


def normalize_images(
    images: jnp.ndarray,
    image_sizes: jnp.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
) -> jnp.ndarray:
    """torchvision's ``GeneralizedRCNNTransform`` normalisation, padding re-zeroed.

    Args:
      images: [B, H, W, 3] float RGB in 0..255 (padding content is ignored).
      image_sizes: [B, 2] int (h, w) of each image inside the padding.

    Returns:
      [B, H, W, 3] float32 ``(x / 255 - mean) / std`` inside each image, 0 in
      the padding (torchvision pads after normalising).
    """
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    h, w = images.shape[1:3]
    inside = (jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]
    )  # [B, H, W]
    return jnp.where(inside[..., None], x, 0.0)


# How mask logits are scored, in training (loss) and inference (probability of a
# detection's class): from the config's ``mask_loss`` and ``class_agnostic_mask``.
# Padded input sides must be multiples of the P5 stride (torchvision's
# size_divisible); P6's grid is then rounded up as torchvision's is.
INPUT_MULTIPLE = FPN_STRIDES[3]

MASK_MODES = {
    # per-class channels; BCE on the ground-truth channel; sigmoid(logits[..., label])
    "sigmoid": mask_loss,
    # per-class channels; softmax cross-entropy; softmax(logits)[..., label]
    "softmax": softmax_mask_loss,
    # one channel; BCE on it; sigmoid(logits[..., 0])
    "class_agnostic": lambda logits, labels, t, pos: class_agnostic_mask_loss(logits, t, pos),
}


def mask_mode(config: ml_collections.ConfigDict) -> str:
    """The key of :data:`MASK_MODES` that ``config`` selects."""
    return "class_agnostic" if config.class_agnostic_mask else config.mask_loss


class MaskRCNN(nn.Module):
    """Mask R-CNN; see the module docstring.

    Attributes:
      config: from :func:`maskrcnn_jax.modeling.get_model_config`.
    """

    config: ml_collections.ConfigDict

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.mask_mode = mask_mode(c)
        self.backbone = ResNet(c.depth, c.norm, c.freeze_at, c.backbone_width, dtype)
        self.fpn = FPN(c.fpn_channels, c.head_norm, dtype)
        self.rpn_head = RPNHead(len(c.aspect_ratios), c.fpn_channels, c.head_norm, dtype)
        self.roi_box_head = BoxHead(
            c.num_classes,
            c.representation_size,
            c.box_roi_size,
            c.sampling_ratio,
            c.roi_align_impl,
            c.roi_pooler,
            dtype,
            strides=FPN_STRIDES,
        )
        self.roi_mask_head = MaskHead(
            1 if self.mask_mode == "class_agnostic" else c.num_classes,
            c.mask_head_dim,
            4,
            c.head_norm,
            c.mask_roi_size,
            c.sampling_ratio,
            c.roi_align_impl,
            c.roi_pooler,
            dtype,
            strides=FPN_STRIDES,
        )

    def _check_images(self, images: jnp.ndarray, image_sizes: jnp.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
        if images.shape[1] % INPUT_MULTIPLE or images.shape[2] % INPUT_MULTIPLE:
            raise ValueError(
                f"image height and width must be multiples of {INPUT_MULTIPLE}, got "
                f"{images.shape[1:3]}"
            )
        if image_sizes.shape != (images.shape[0], 2):
            raise ValueError(
                f"image_sizes must be [{images.shape[0]}, 2], got {tuple(image_sizes.shape)}"
            )

    def features(self, images: jnp.ndarray, image_sizes: jnp.ndarray) -> list[jnp.ndarray]:
        """FPN features.

        Args:
          images: [B, H, W, 3] float RGB 0..255, H and W multiples of 32,
            each image at the top-left of its padding.
          image_sizes: [B, 2] int (h, w) of each image inside the padding.

        Returns:
          [P2, P3, P4, P5, P6], P_l [B, ceil(H / 2^l), ceil(W / 2^l), fpn_channels]
          in the compute dtype.
        """
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        self._check_images(images, image_sizes)
        c = self.config
        x = normalize_images(images, image_sizes, c.image_mean, c.image_std)
        return self.fpn(self.backbone(x.astype(jnp.dtype(c.dtype))))

    def rpn(self, features: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
        """RPN outputs of every anchor.

        Args:
          features: [P2..P6] from :meth:`features`.

        Returns:
          objectness: [B, A] float32 logits; deltas: [B, A, 4] float32; in the
          order of ``anchors_for(config, (H, W))``.
        """
        return self.rpn_head(features)

    def box_head(
        self, features: Sequence[jnp.ndarray], rois: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Box head on regions.

        Args:
          features: [P2..P6] (P6 unused).
          rois: [B, R, 4] xyxy padded-input pixels.

        Returns:
          class_logits [B, R, K] float32, box_deltas [B, R, K, 4] float32.
        """
        return self.roi_box_head(features, rois)

    def mask_head(self, features: Sequence[jnp.ndarray], rois: jnp.ndarray) -> jnp.ndarray:
        """Mask logits of every class.

        Args:
          features: [P2..P6] (P6 unused).
          rois: [B, R, 4] xyxy padded-input pixels.

        Returns:
          [B, R, 28, 28, K] float32 logits ([B, R, 28, 28, 1] with
          ``class_agnostic_mask``).
        """
        return self.roi_mask_head(features, rois)

    def proposals(
        self,
        objectness: jnp.ndarray,
        deltas: jnp.ndarray,
        image_shape: Sequence[int],
        image_sizes: jnp.ndarray,
        train: bool = False,
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """:func:`~maskrcnn_jax.modeling.rpn.propose` with this config's settings.

        Args:
          objectness, deltas: from :meth:`rpn`.
          image_shape: static (H, W) of the padded input.
          image_sizes: [B, 2] int.
          train: use the train-time top-n.

        Returns:
          boxes [B, P, 4], scores [B, P], valid [B, P] (no gradient).
        """
        c = self.config
        anchors, level_sizes = anchors_for(c, image_shape)
        pre = c.rpn_pre_nms_top_n_train if train else c.rpn_pre_nms_top_n_test
        post = c.rpn_post_nms_top_n_train if train else c.rpn_post_nms_top_n_test
        return propose(
            objectness,
            deltas,
            anchors,
            image_sizes,
            level_sizes,
            pre,
            post,
            c.rpn_nms_thresh,
            c.rpn_min_size,
            c.rpn_score_thresh,
        )

    def losses(
        self,
        images: jnp.ndarray,
        image_sizes: jnp.ndarray,
        targets: Mapping[str, jnp.ndarray],
        key: jax.Array,
    ) -> dict[str, jnp.ndarray]:
        """The five training losses of a batch (torchvision's ``MaskRCNN`` in train mode).

        The proposals come from :meth:`proposals` with ``train=True``, as in
        inference but with the train-time top-n. Anchors are sampled for the
        RPN losses, RoIs (proposals + ground truth) for the box head, and the
        mask head runs on the first ``mask_rois_per_image`` RoI slots, which
        hold the positives (see :func:`~maskrcnn_jax.targets.roi_targets`);
        of those, on the shortest of ``mask_head_prefixes`` static prefixes
        that holds every image's positives, picked at run time.
        Sampling sizes and ``smooth_l1_beta`` come from the model config.

        Args:
          images: [B, H, W, 3] uint8 or float RGB 0..255, H and W multiples of 32.
          image_sizes: [B, 2] int (h, w) of each image inside the padding.
          targets: ground truth, M instance slots per image: ``boxes [B, M, 4]``
            xyxy padded-input pixels, ``labels [B, M]`` int (1..K-1),
            ``masks [B, M, S, S]`` instance masks cropped to their boxes
            (see :func:`~maskrcnn_jax.targets.mask_targets`), ``is_crowd [B, M]``
            bool, ``valid [B, M]`` bool (False in padding slots). Other keys
            are ignored.
          key: PRNG key of the anchor and RoI sampling.

        Returns:
          float32 scalars ``rpn_objectness_loss``, ``rpn_box_loss``,
          ``classifier_loss``, ``box_loss`` and ``mask_loss`` (the loss of
          :data:`MASK_MODES` the config selects); their sum is the training
          loss. With ``mutable=["intermediates"]``, the mask loss's inputs are
          also returned: ``mask_logits [B, p, 28, 28, K or 1]``,
          ``mask_labels [B, p]``, ``mask_targets [B, p, 28, 28]`` and
          ``mask_positive [B, p]``.
        """
        c = self.config
        images = images.astype(jnp.float32)
        b = images.shape[0]
        image_shape = images.shape[1:3]
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        gt_boxes = targets["boxes"].astype(jnp.float32)  # [B, M, 4]
        gt_labels, gt_valid, gt_crowd = targets["labels"], targets["valid"], targets["is_crowd"]
        k_rpn, k_roi = jax.random.split(key)

        feats = self.features(images, image_sizes)
        objectness, deltas = self.rpn(feats)  # [B, A], [B, A, 4]
        anchors, _ = anchors_for(c, image_shape)
        rpn_t = jax.vmap(
            lambda g, v, cr, k: rpn_targets(
                anchors, g, v, cr, k, c.rpn_batch_size_per_image, c.rpn_positive_fraction
            )
        )(gt_boxes, gt_valid, gt_crowd, jax.random.split(k_rpn, b))
        rpn_obj, rpn_box = rpn_loss(
            objectness, deltas, rpn_t.positive, rpn_t.negative, rpn_t.deltas, c.smooth_l1_beta
        )

        proposals, _, proposal_valid = self.proposals(
            objectness, deltas, image_shape, image_sizes, train=True
        )  # [B, P, 4], [B, P]; no gradient
        roi_t = jax.vmap(
            lambda p, pv, g, lab, v, cr, k: roi_targets(
                p, pv, g, lab, v, cr, k, c.roi_batch_size_per_image, c.roi_positive_fraction
            )
        )(
            proposals,
            proposal_valid,
            gt_boxes,
            gt_labels,
            gt_valid,
            gt_crowd,
            jax.random.split(k_roi, b),
        )  # fields [B, S, ...], S = roi_batch_size_per_image
        class_logits, box_deltas = self.box_head(feats, roi_t.rois)
        cls, box = box_head_loss(
            class_logits, box_deltas, roi_t.labels, roi_t.deltas, roi_t.valid, c.smooth_l1_beta
        )

        # Positives come first in the RoI slots, in random order: the mask head
        # runs on a prefix that holds every positive (or, with a smaller
        # mask_rois_per_image, a uniform random subset of them).
        p = mask_slots_per_image(c)
        mode = self.mask_mode

        def mask_branch(n: int):
            def run(module, feats, rois, matched, labels, positive, gt_masks, gt_boxes):
                rois = rois[:, :n]
                logits = module.mask_head(feats, rois)  # [B, n, 28, 28, K]
                m = logits.shape[2]
                mask_t = jax.vmap(lambda gm, gb, r, i: mask_targets(gm, gb, r, i, m))(
                    gt_masks, gt_boxes, rois, matched[:, :n]
                )  # [B, n, 28, 28]
                labels, positive = labels[:, :n], positive[:, :n]
                loss = MASK_MODES[mode](logits, labels, mask_t, positive)
                return loss, (logits, labels, mask_t, positive)

            return run

        def loss_only(n: int):
            run = mask_branch(n)
            return lambda module, *args: run(module, *args)[0]

        positive = roi_t.positive[:, :p]  # [B, p], a prefix of each row
        mask_args = (feats, roi_t.rois[:, :p], roi_t.matched[:, :p], roi_t.labels[:, :p],
                     positive, targets["masks"], gt_boxes)  # fmt: skip
        if self.is_mutable_collection("intermediates"):
            # Recorded for inspection (apply(..., mutable=["intermediates"])) on all p slots.
            mask, recorded = mask_branch(p)(self, *mask_args)
            for name, value in zip(("logits", "labels", "targets", "positive"), recorded):
                self.sow("intermediates", f"mask_{name}", value)
        else:
            # The slots after the shortest prefix that holds every image's positives
            # carry no loss, so this is exact. Each branch is rematerialised: the
            # zero-filled residuals of the branches not taken cost more than the
            # forward they save (XLA:CPU, shapes recipe).
            mask = on_shortest_prefix(self, positive, c.mask_head_prefixes, loss_only,
                                      *mask_args, remat=True)  # fmt: skip
        return {
            "rpn_objectness_loss": rpn_obj,
            "rpn_box_loss": rpn_box,
            "classifier_loss": cls,
            "box_loss": box,
            "mask_loss": mask,
        }

    def __call__(
        self, images: jnp.ndarray, image_sizes: jnp.ndarray, intermediates: bool = False
    ) -> dict[str, Any]:
        """Inference.

        Args:
          images: [B, H, W, 3] float RGB 0..255, H and W multiples of 32.
          image_sizes: [B, 2] int (h, w) of each image inside the padding.
          intermediates: also return ``features`` ([P2..P6]), ``proposals``
            [B, P, 4], ``proposal_scores`` [B, P] and ``proposal_valid`` [B, P]
            (for debugging and parity tests).

        Returns:
          dict, D = ``detections_per_img``, coordinates in padded-input pixels:
            boxes [B, D, 4] xyxy, scores [B, D], labels [B, D] int32,
            masks [B, D, 28, 28] float32 probabilities of the predicted class
            (in the box frame; see :meth:`detection_masks`), valid [B, D]
            bool. Slots are sorted by descending score; invalid slots hold
            zeros.
        """
        c = self.config
        image_sizes = jnp.asarray(image_sizes, jnp.int32)
        feats = self.features(images, image_sizes)
        objectness, deltas = self.rpn(feats)
        proposals, proposal_scores, proposal_valid = self.proposals(
            objectness, deltas, images.shape[1:3], image_sizes
        )
        class_logits, box_deltas = self.box_head(feats, proposals)
        boxes, scores, labels, valid = detect(
            class_logits,
            box_deltas,
            proposals,
            proposal_valid,
            image_sizes,
            c.box_score_thresh,
            c.box_nms_thresh,
            c.box_min_size,
            c.detections_per_img,
            c.box_candidates,
        )
        masks = self.detection_masks(feats, boxes, labels, valid)
        out = {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks, "valid": valid}
        if intermediates:
            out.update(
                features=feats,
                proposals=proposals,
                proposal_scores=proposal_scores,
                proposal_valid=proposal_valid,
            )
        return out

    def detection_masks(
        self,
        features: Sequence[jnp.ndarray],
        boxes: jnp.ndarray,
        labels: jnp.ndarray,
        valid: jnp.ndarray,
    ) -> jnp.ndarray:
        """Mask probabilities of detections, the head run only on the slots needed.

        Valid detections fill a prefix of the D slots (see ``detect``). The
        mask head, the costliest per-detection stage, runs on the shortest of
        a few static prefixes (``mask_head_prefixes`` of them: D/8, D/4, D/2, D
        by default) that holds every image's detections, chosen at run time
        by ``lax.switch``; so, as in torchvision, a few detections cost little.

        Args:
          features: [P2..P6].
          boxes: [B, D, 4] detection boxes; labels: [B, D] int; valid: [B, D].

        Returns:
          [B, D, 28, 28] float32 probabilities of each slot's class, zeros in
          invalid slots: ``sigmoid(logits[..., label])`` (only that channel is
          computed), ``softmax(logits, -1)[..., label]`` with
          ``mask_loss="softmax"``, ``sigmoid(logits[..., 0])`` with
          ``class_agnostic_mask``.
        """
        d = boxes.shape[1]
        mode = self.mask_mode

        def branch(n):
            def run(module, feats, boxes, labels):
                boxes, labels = boxes[:, :n], labels[:, :n]
                if mode == "softmax":
                    logits = module.roi_mask_head(feats, boxes)  # [B, n, M, M, K]
                    probs = jax.nn.softmax(logits, axis=-1)
                    probs = jnp.take_along_axis(probs, labels[..., None, None, None], -1)[..., 0]
                else:
                    if mode == "class_agnostic":
                        labels = jnp.zeros_like(labels)  # the one channel
                    probs = jax.nn.sigmoid(module.roi_mask_head(feats, boxes, labels))
                return jnp.pad(probs, ((0, 0), (0, d - n), (0, 0), (0, 0)))  # [B, D, M, M]

            return run

        probs = on_shortest_prefix(self, valid, self.config.mask_head_prefixes, branch,
                                   features, boxes, labels)  # fmt: skip
        return jnp.where(valid[..., None, None], probs, 0.0)

    def initialize(self, images: jnp.ndarray, image_sizes: jnp.ndarray) -> Any:
        """Touches every submodule cheaply (no NMS); used by :func:`init_model`."""
        feats = self.features(images, image_sizes)
        self.rpn(feats)
        rois = jnp.tile(jnp.asarray([[[0.0, 0.0, 16.0, 16.0]]]), (images.shape[0], 1, 1))
        self.box_head(feats, rois)
        return self.mask_head(feats, rois)


def init_model(
    config: ml_collections.ConfigDict,
    key: jax.Array,
    image_size: Sequence[int] = (64, 64),
) -> dict[str, Any]:
    """Fresh variables of :class:`MaskRCNN`.

    Args:
      config: model config.
      key: PRNG key.
      image_size: (H, W) of the dummy input (multiples of 32; the variables do
        not depend on it).

    Returns:
      ``{"params": ..., "constants": ...}`` (``"constants"`` only with
      ``norm="frozen_bn"``: the folded batch-norm scale and bias, identity).
    """
    model = MaskRCNN(config)
    h, w = int(image_size[0]), int(image_size[1])
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    sizes = jnp.asarray(np.array([[h, w]], np.int32))
    # Initialisers draw from an "rbg" key derived from `key`: XLA compiles its
    # RngBitGenerator several times faster than threefry for ~100 parameters.
    rbg_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    init = jax.jit(lambda k: model.init(k, images, sizes, method=MaskRCNN.initialize))
    return dict(init(rbg_key))
