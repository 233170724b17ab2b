"""The Mask R-CNN losses: L = L_rpn_cls + L_rpn_box + L_cls + L_box + L_mask.

Batched over images like torchvision (sums over the whole batch, normalised by
the batch's sample counts), with static shapes: sampled entries are selected
by boolean masks instead of gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# The model config's ``mask_loss``: :func:`mask_loss` (per-class sigmoid, the default) or
# :func:`softmax_mask_loss` (per-pixel softmax over the classes).
MASK_LOSSES = ("sigmoid", "softmax")


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Element-wise smooth L1 (Huber / beta); ``beta=0`` is plain L1 (Detectron2)."""
    diff = jnp.abs(pred - target)
    if beta == 0:
        return diff
    return jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    return num / jnp.maximum(den, 1)


def rpn_loss(
    objectness: jnp.ndarray,
    deltas: jnp.ndarray,
    positive: jnp.ndarray,
    negative: jnp.ndarray,
    target_deltas: jnp.ndarray,
    beta: float = 1.0 / 9,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """RPN objectness and box losses (torchvision ``RegionProposalNetwork.compute_loss``).

    Args:
      objectness: [B, A] logits; deltas: [B, A, 4] predicted.
      positive, negative: [B, A] bool sampled anchors.
      target_deltas: [B, A, 4].
      beta: smooth-L1 beta.

    Returns:
      (objectness loss: binary cross-entropy averaged over the sampled anchors,
       box loss: smooth L1 summed over positives / number of sampled anchors).
    """
    sampled = positive | negative
    num_sampled = jnp.sum(sampled)
    bce = optax.sigmoid_binary_cross_entropy(
        objectness.astype(jnp.float32), positive.astype(jnp.float32)
    )
    obj = _safe_div(jnp.sum(jnp.where(sampled, bce, 0.0)), num_sampled)
    box = smooth_l1(deltas.astype(jnp.float32), target_deltas, beta).sum(-1)
    box = _safe_div(jnp.sum(jnp.where(positive, box, 0.0)), num_sampled)
    return obj, box


def box_head_loss(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    labels: jnp.ndarray,
    target_deltas: jnp.ndarray,
    valid: jnp.ndarray,
    beta: float = 1.0 / 9,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Classification and box regression losses (torchvision ``fastrcnn_loss``).

    Args:
      class_logits: [B, S, K] (K includes background at 0).
      box_deltas: [B, S, K, 4] per-class deltas.
      labels: [B, S] int, 0 = background.
      target_deltas: [B, S, 4].
      valid: [B, S] bool sampled RoIs.

    Returns:
      (cross-entropy averaged over sampled RoIs, smooth L1 on the ground-truth
       class's deltas of positive RoIs summed / number of sampled RoIs).
    """
    num = jnp.sum(valid)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits.astype(jnp.float32), labels)
    cls = _safe_div(jnp.sum(jnp.where(valid, ce, 0.0)), num)
    picked = jnp.take_along_axis(box_deltas, labels[..., None, None], axis=-2)[..., 0, :]
    box = smooth_l1(picked.astype(jnp.float32), target_deltas, beta).sum(-1)
    box = _safe_div(jnp.sum(jnp.where(valid & (labels > 0), box, 0.0)), num)
    return cls, box


def mask_loss(
    mask_logits: jnp.ndarray, labels: jnp.ndarray, targets: jnp.ndarray, positive: jnp.ndarray
) -> jnp.ndarray:
    """Per-pixel sigmoid cross-entropy on the ground-truth class's channel only.

    The classes do not compete (no softmax over classes), as in the paper.

    Args:
      mask_logits: [B, P, M, M, K].
      labels: [B, P] int ground-truth class of each RoI.
      targets: [B, P, M, M] float in [0, 1].
      positive: [B, P] bool, RoIs that contribute.

    Returns:
      Mean binary cross-entropy over all pixels of the positive RoIs (0 when
      there are none, with a zero gradient).
    """
    logits = jnp.take_along_axis(mask_logits, labels[:, :, None, None, None], axis=-1)[..., 0]
    bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
    per_roi = jnp.mean(bce, axis=(-2, -1))
    return _safe_div(jnp.sum(jnp.where(positive, per_roi, 0.0)), jnp.sum(positive))


def softmax_mask_loss(
    mask_logits: jnp.ndarray, labels: jnp.ndarray, targets: jnp.ndarray, positive: jnp.ndarray
) -> jnp.ndarray:
    """Per-pixel softmax over the K class channels: the paper's "multinomial" masks.

    The ablation of He et al. (2017), Table 2b: as in FCN semantic
    segmentation, every pixel of a RoI is classified among the K classes
    (channel 0 is background), so the classes compete. A pixel's target is
    the RoI's ground-truth class where the mask covers it and background
    elsewhere. The targets here are the soft [0, 1] ones :func:`mask_loss`
    takes (torchvision RoIAligns the binary masks), so a pixel's target
    distribution is ``t`` on the ground-truth class and ``1 - t`` on
    background, and the loss is its cross-entropy with the softmax:
    ``-(t * log p[label] + (1 - t) * log p[0])``.

    * With binary targets this is exactly ``F.cross_entropy(logits, class_map)``
      with ``class_map = label * target`` (Detectron2 binarises its targets at
      0.5; ``torchvision`` keeps them soft).
    * With K = 2 it equals :func:`mask_loss` on the logit ``z1 - z0``, so the
      only change from the default loss is the competition between classes.

    Args:
      mask_logits: [B, P, M, M, K], channel 0 background.
      labels: [B, P] int ground-truth class of each RoI (>= 1 where positive).
      targets: [B, P, M, M] float in [0, 1].
      positive: [B, P] bool, RoIs that contribute.

    Returns:
      Mean cross-entropy over all pixels of the positive RoIs, normalised as
      :func:`mask_loss` (0 with a zero gradient when there are none).
    """
    logp = jax.nn.log_softmax(mask_logits.astype(jnp.float32), axis=-1)  # [B, P, M, M, K]
    logp_fg = jnp.take_along_axis(logp, labels[:, :, None, None, None], axis=-1)[..., 0]
    targets = targets.astype(jnp.float32)
    ce = -(targets * logp_fg + (1.0 - targets) * logp[..., 0])  # [B, P, M, M]
    per_roi = jnp.mean(ce, axis=(-2, -1))
    return _safe_div(jnp.sum(jnp.where(positive, per_roi, 0.0)), jnp.sum(positive))


def class_agnostic_mask_loss(
    mask_logits: jnp.ndarray, targets: jnp.ndarray, positive: jnp.ndarray
) -> jnp.ndarray:
    """Per-pixel sigmoid cross-entropy on a single mask channel shared by all classes.

    The class-agnostic masks of He et al. (2017) (Detectron2's
    ``CLS_AGNOSTIC_MASK``): the head predicts one mask per RoI whatever its
    class, trained with the same binary cross-entropy as :func:`mask_loss`.

    Args:
      mask_logits: [B, P, M, M, 1].
      targets: [B, P, M, M] float in [0, 1].
      positive: [B, P] bool, RoIs that contribute.

    Returns:
      Mean binary cross-entropy over all pixels of the positive RoIs (0 with
      a zero gradient when there are none).

    Raises:
      ValueError: if ``mask_logits`` has more than one channel.
    """
    if mask_logits.shape[-1] != 1:
        raise ValueError(
            f"class-agnostic mask_logits must have 1 channel, got shape {tuple(mask_logits.shape)}"
        )
    labels = jnp.zeros(mask_logits.shape[:2], jnp.int32)
    return mask_loss(mask_logits, labels, targets, positive)
