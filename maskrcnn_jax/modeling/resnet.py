"""ResNet backbone (torchvision layout, v1.5: stride on the 3x3 conv), NHWC.

Returns C2..C5, the outputs of ``layer1..layer4`` (strides 4, 8, 16, 32).
Variable names follow torchvision (``conv1``, ``layer2_0/conv2``,
``layer3_0/downsample``) so that the converter is a direct mapping.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.modeling.layers import ConvNorm, kaiming_fan_out

# depth -> (block kind, blocks per stage)
STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def stage_channels(depth: int, width: int = 64) -> tuple[int, ...]:
    """Output channels of C2..C5."""
    expansion = 1 if STAGES[depth][0] == "basic" else 4
    return tuple(width * 2**i * expansion for i in range(4))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    planes: int
    stride: int = 1
    norm: str = "frozen_bn"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, Cin] -> [B, H/stride, W/stride, planes]."""
        cn = {"norm": self.norm, "dtype": self.dtype, "kernel_init": kaiming_fan_out}
        y = ConvNorm(self.planes, 3, self.stride, relu=True, name="conv1", **cn)(x)
        y = ConvNorm(self.planes, 3, 1, name="conv2", **cn)(y)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = ConvNorm(self.planes, 1, self.stride, name="downsample", **cn)(x)
        return nn.relu(y + x.astype(y.dtype))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 x4 (ResNet-50/101)."""

    planes: int
    stride: int = 1
    norm: str = "frozen_bn"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
        cn = {"norm": self.norm, "dtype": self.dtype, "kernel_init": kaiming_fan_out}
        out = 4 * self.planes
        y = ConvNorm(self.planes, 1, 1, relu=True, name="conv1", **cn)(x)
        y = ConvNorm(self.planes, 3, self.stride, relu=True, name="conv2", **cn)(y)
        y = ConvNorm(out, 1, 1, name="conv3", **cn)(y)
        if self.stride != 1 or x.shape[-1] != out:
            x = ConvNorm(out, 1, self.stride, name="downsample", **cn)(x)
        return nn.relu(y + x.astype(y.dtype))


class ResNet(nn.Module):
    """ResNet trunk returning C2..C5.

    Attributes:
      depth: 18, 34, 50 or 101.
      norm: ``"frozen_bn"`` or ``"gn"``.
      freeze_at: stages (1 = stem, 2 = + layer1, ... 5 = all) whose output is
        passed through ``stop_gradient``, so that their parameters get zero
        gradient.
      width: stem width (64 in the standard model).
      dtype: compute dtype.
    """

    depth: int = 50
    norm: str = "frozen_bn"
    freeze_at: int = 2
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        """x: [B, H, W, 3] normalised image -> [C2, C3, C4, C5], C_k [B, H/2^k, W/2^k, C]."""
        if self.depth not in STAGES:
            raise ValueError(f"depth must be one of {sorted(STAGES)}, got {self.depth}")
        kind, blocks = STAGES[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        x = ConvNorm(
            self.width,
            7,
            2,
            padding=3,
            norm=self.norm,
            relu=True,
            dtype=self.dtype,
            kernel_init=kaiming_fan_out,
            name="conv1",
        )(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for stage, n in enumerate(blocks):
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                x = block_cls(
                    self.width * 2**stage,
                    stride,
                    self.norm,
                    self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )(x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return outputs
