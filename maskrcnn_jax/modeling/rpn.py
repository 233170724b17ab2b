"""Region proposal network: the head and the (non-differentiable) proposal step.

:func:`propose` equals torchvision's ``RegionProposalNetwork.filter_proposals``
with static shapes: per level the ``pre_nms_top_n`` best anchors by
objectness, decoded, clipped, small boxes dropped, NMS per level, then the
``post_nms_top_n`` best over all levels. It is written for one image and
vmapped; training calls it with the train-time top-n.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import ConvNorm
from maskrcnn_jax.ops import RPN_BOX_WEIGHTS, clip_boxes, decode_boxes, nms


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 objectness and box-delta convs, on every level.

    Attributes:
      num_anchors: anchors per location (3 aspect ratios x 1 size).
      channels: width of the shared conv (= FPN channels).
      norm: ``"none"`` or ``"gn"`` after the shared conv.
    """

    num_anchors: int = 3
    channels: int = 256
    norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Objectness logits and deltas of every anchor.

        Args:
          features: per level [B, h_l, w_l, C] (P2..P6).

        Returns:
          objectness: [B, A] float32 logits, A = sum_l h_l * w_l * num_anchors,
            ordered per level [h, w, anchor] row-major (``generate_anchors`` order).
          deltas: [B, A, 4] float32 (dx, dy, dw, dh).
        """
        init = nn.initializers.normal(0.01)
        conv = ConvNorm(
            self.channels,
            3,
            norm=self.norm,
            relu=True,
            dtype=self.dtype,
            kernel_init=init,
            name="conv",
        )
        cls = ConvNorm(self.num_anchors, 1, dtype=self.dtype, kernel_init=init, name="cls_logits")
        box = ConvNorm(
            4 * self.num_anchors, 1, dtype=self.dtype, kernel_init=init, name="bbox_pred"
        )
        logits, deltas = [], []
        for x in features:
            b = x.shape[0]
            t = conv(x)
            logits.append(cls(t).reshape(b, -1))  # [B, h*w*a]
            deltas.append(box(t).reshape(b, -1, 4))  # channel a*4+c -> [B, h*w*a, 4]
        objectness = jnp.concatenate(logits, axis=1).astype(jnp.float32)
        return objectness, jnp.concatenate(deltas, axis=1).astype(jnp.float32)


def _top_per_level(
    objectness: jnp.ndarray, level_sizes: Sequence[int], pre_nms_top_n: int
) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
    """Best ``min(pre_nms_top_n, n_l)`` anchors of each level, best first.

    Returns:
      per level: (logits [k_l], index [k_l] int32 into the flat anchors).
    """
    out, start = [], 0
    for n in level_sizes:
        top, idx = jax.lax.top_k(objectness[start : start + n], min(pre_nms_top_n, n))
        out.append((top, (idx + start).astype(jnp.int32)))
        start += n
    return out


def propose_single(
    objectness: jnp.ndarray,
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    image_size: jnp.ndarray,
    level_sizes: Sequence[int],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float = 0.0,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Proposals of one image; see :func:`propose`.

    Each level keeps its own candidate count k_l = min(pre_nms_top_n, n_l) and runs
    its own NMS (torchvision's batched_nms with the level as label), in a static
    loop over the levels: padded to one count and vmapped, the small top levels
    (12 anchors on P6 of a 128x128 image) would run as many NMS tiles as the
    largest, since a vmapped loop runs until every lane is done.

    Args:
      objectness: [A] logits; deltas: [A, 4]; anchors: [A, 4];
      image_size: [2] (h, w) of the image inside the padding.

    Returns:
      boxes [P, 4], scores [P] (sigmoid), valid [P]; P = post_nms_top_n.
    """
    kept_boxes, kept_scores, kept_valid = [], [], []
    for logits, index in _top_per_level(objectness, level_sizes, pre_nms_top_n):
        boxes = decode_boxes(deltas[index], anchors[index], RPN_BOX_WEIGHTS)  # [k_l, 4]
        boxes = clip_boxes(boxes, image_size)
        scores = jax.nn.sigmoid(logits)
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        valid = (w >= min_size) & (h >= min_size) & (scores >= score_thresh)
        keep, keep_valid = nms(
            boxes, scores, iou_threshold=nms_thresh, max_outputs=len(logits), valid=valid
        )  # [k_l] each, kept boxes first in score order
        kept_boxes.append(boxes[keep])
        kept_scores.append(scores[keep])
        kept_valid.append(keep_valid)
    boxes = jnp.concatenate(kept_boxes)
    scores = jnp.concatenate(kept_scores)
    keep_valid = jnp.concatenate(kept_valid)
    # Best post_nms_top_n over levels; the stable sort keeps torchvision's tie order
    # (level by level, each in its NMS order).
    extra = post_nms_top_n - len(scores)
    if extra > 0:  # fewer candidates than output slots: pad with invalid ones
        boxes = jnp.pad(boxes, ((0, extra), (0, 0)))
        scores = jnp.pad(scores, (0, extra))
        keep_valid = jnp.pad(keep_valid, (0, extra))
    order = jnp.argsort(jnp.where(keep_valid, -scores, jnp.inf), stable=True)[:post_nms_top_n]
    out_valid = keep_valid[order]
    out_boxes = jnp.where(out_valid[:, None], boxes[order], 0.0)
    out_scores = jnp.where(out_valid, scores[order], 0.0)
    return out_boxes, out_scores, out_valid


def propose(
    objectness: jnp.ndarray,
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    image_sizes: jnp.ndarray,
    level_sizes: Sequence[int],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float = 0.0,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Proposals for a batch, as torchvision's ``filter_proposals``; no gradient.

    Args:
      objectness: [B, A] RPN logits, in :func:`generate_anchors` order.
      deltas: [B, A, 4] RPN box deltas.
      anchors: [A, 4] xyxy anchors of the padded input.
      image_sizes: [B, 2] int (h, w) of each image inside the padding; boxes
        are clipped to it.
      level_sizes: static anchors per level (``num_anchors_per_level``).
      pre_nms_top_n: anchors kept per level before NMS.
      post_nms_top_n: proposals kept per image after NMS (the output size P).
      nms_thresh: IoU threshold of the per-level NMS.
      min_size: boxes with a side < min_size (after clipping) are dropped.
      score_thresh: boxes with sigmoid score < this are dropped.

    Returns:
      boxes: [B, P, 4] xyxy, by descending score; padded slots are zeros.
      scores: [B, P] sigmoid objectness, 0 in padded slots.
      valid: [B, P] bool.
    """
    if objectness.ndim != 2 or deltas.shape != (*objectness.shape, 4):
        raise ValueError(
            f"objectness must be [B, A] and deltas [B, A, 4], got {tuple(objectness.shape)} "
            f"and {tuple(deltas.shape)}"
        )
    if anchors.shape != (objectness.shape[1], 4) or sum(level_sizes) != objectness.shape[1]:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} / level_sizes (sum {sum(level_sizes)}) do not "
            f"match A={objectness.shape[1]}"
        )
    objectness = jax.lax.stop_gradient(objectness.astype(jnp.float32))
    deltas = jax.lax.stop_gradient(deltas.astype(jnp.float32))
    fn = functools.partial(
        propose_single,
        level_sizes=tuple(int(n) for n in level_sizes),
        pre_nms_top_n=int(pre_nms_top_n),
        post_nms_top_n=int(post_nms_top_n),
        nms_thresh=float(nms_thresh),
        min_size=float(min_size),
        score_thresh=float(score_thresh),
    )
    boxes, scores, valid = jax.vmap(fn, in_axes=(0, 0, None, 0))(
        objectness, deltas, anchors, image_sizes
    )
    return jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(scores), valid
