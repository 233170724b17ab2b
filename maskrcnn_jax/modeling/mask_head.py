"""Mask head (torchvision ``MaskRCNNHeads`` + ``MaskRCNNPredictor``).

RoIAlign 14x14 on P2..P5 -> four 3x3 convs + ReLU -> 2x2 stride-2 transposed
conv + ReLU -> 1x1 conv to one 28x28 logit map per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import ConvNorm, kaiming_fan_out
from maskrcnn_jax.ops import FPN_STRIDES, multilevel_roi_pooler


class ConvTranspose2x2(nn.Module):
    """``ConvTranspose2d(kernel_size=2, stride=2)``: each pixel -> a 2x2 block.

    Params: ``kernel [2, 2, Cin, Cout]`` (torch's ``[Cin, Cout, 2, 2]``
    transposed, no flip: output pixel (2i + a, 2j + b) = x[i, j] @ kernel[a, b]),
    ``bias [Cout]``.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [N, h, w, Cin] -> [N, 2h, 2w, features]."""
        kernel = self.param(
            "kernel", kaiming_fan_out, (2, 2, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        n, h, w, c = x.shape
        # One [N*h*w, Cin] x [Cin, 4*Cout] matrix product, then the 2x2 blocks interleaved.
        # Written as the einsum "nhwc,abco->nhawbo", XLA:CPU's backward transposed the whole
        # [N, 2h, 2w, Cout] cotangent for the kernel gradient: 2x the fwd+bwd time here.
        k = kernel.astype(self.dtype).transpose(2, 0, 1, 3).reshape(c, 4 * self.features)
        y = (x.astype(self.dtype).reshape(n * h * w, c) @ k).reshape(n, h, w, 2, 2, self.features)
        y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, self.features)
        return y + bias.astype(self.dtype)


class ClassLogits(nn.Module):
    """1x1 conv to one logit map per class (``mask_fcn_logits``).

    Params: ``kernel [1, 1, Cin, K]``, ``bias [K]``.
    """

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, labels: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: [N, h, w, Cin]; labels: optional [N] int.

        Returns:
          [N, h, w, K], or [N, h, w] (the map of each row's label) when
          ``labels`` is given; only that channel is computed.
        """
        shape = (1, 1, x.shape[-1], self.num_classes)
        kernel = self.param("kernel", kaiming_fan_out, shape, jnp.float32)[0, 0]  # [Cin, K]
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        x = x.astype(self.dtype)
        if labels is None:
            return jnp.einsum("nhwc,ck->nhwk", x, kernel.astype(self.dtype)) + bias.astype(
                self.dtype
            )
        w = kernel.T[labels].astype(self.dtype)  # [N, Cin]
        return jnp.einsum("nhwc,nc->nhw", x, w) + bias[labels, None, None].astype(self.dtype)


class MaskHead(nn.Module):
    """Mask logits of regions.

    Attributes:
      num_classes: mask channels: K, including background, or 1 for
        class-agnostic masks.
      dim: conv width (256).
      num_convs: 3x3 convs before the upsampling (4).
      norm: ``"none"`` or ``"gn"`` after each 3x3 conv.
      roi_size, sampling_ratio: RoI pooling output size and RoIAlign samples.
      roi_pooler: ``"align"``, ``"align_v2"`` or ``"pool"`` (``ops.ROI_POOLERS``).
      roi_align_impl: implementation of the align variants (``ops.roi_align_impl_names``).
      strides: strides of the FPN levels P2..P6; RoIAlign reads P2..P5.
    """

    num_classes: int = 91
    dim: int = 256
    num_convs: int = 4
    norm: str = "none"
    roi_size: int = 14
    sampling_ratio: int = 2
    roi_align_impl: str = "reference"
    roi_pooler: str = "align"
    dtype: Any = jnp.float32
    strides: Sequence[int] = FPN_STRIDES

    @nn.compact
    def __call__(
        self,
        features: Sequence[jnp.ndarray],
        rois: jnp.ndarray,
        labels: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Mask logits.

        Args:
          features: [P2, P3, P4, P5(, P6)], each [B, h_l, w_l, C]; P6 unused.
          rois: [B, R, 4] xyxy input pixels (no gradient flows to them).
          labels: optional [B, R] int classes; when given only those classes'
            maps are computed (inference: the 1x1 conv runs on one channel).

        Returns:
          [B, R, 2S, 2S, K] float32 logits (S = roi_size), or [B, R, 2S, 2S]
          when ``labels`` is given.
        """
        b, r = rois.shape[:2]
        x = multilevel_roi_pooler(
            list(features[:4]),
            rois,
            self.roi_size,
            tuple(self.strides[:4]),
            pooler=self.roi_pooler,
            sampling_ratio=self.sampling_ratio,
            impl=self.roi_align_impl,
        )  # [B, R, 14, 14, C]
        x = x.reshape(b * r, *x.shape[2:])
        for i in range(self.num_convs):
            x = ConvNorm(
                self.dim,
                3,
                norm=self.norm,
                relu=True,
                dtype=self.dtype,
                kernel_init=kaiming_fan_out,
                canonical_grads=True,  # runs in a lax.switch branch (mask_head_prefixes)
                name=f"mask_fcn{i + 1}",
            )(x)
        x = nn.relu(ConvTranspose2x2(self.dim, self.dtype, name="conv5_mask")(x))  # [BR, 28, 28, D]
        if labels is not None:
            labels = labels.reshape(b * r)
        y = ClassLogits(self.num_classes, self.dtype, name="mask_fcn_logits")(x, labels)
        return y.reshape(b, r, *y.shape[1:]).astype(jnp.float32)
