"""Feature pyramid network (Lin et al., 2017) as torchvision's ``FeaturePyramidNetwork``.

C2..C5 -> P2..P5 through 1x1 lateral convs, nearest top-down upsampling and
3x3 output convs; P6 = P5 subsampled by a 1x1 stride-2 max-pool
(``LastLevelMaxPool``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.modeling.layers import ConvNorm

# torchvision's FPN init: kaiming_uniform_(a=1) -> bound sqrt(3 / fan_in).
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """``F.interpolate(mode="nearest", size=size)`` on NHWC.

    Args:
      x: [B, h, w, C].
      size: (H, W) output size, static.

    Returns:
      [B, H, W, C], source index ``floor(i * h / H)`` as torch's legacy nearest.
    """
    h, w = x.shape[1:3]
    out_h, out_w = size
    if (out_h, out_w) == (2 * h, 2 * w):
        b, c = x.shape[0], x.shape[-1]
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, out_h, out_w, c)
    rows = np.minimum(
        np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)), h - 1
    ).astype(np.int32)
    cols = np.minimum(
        np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)), w - 1
    ).astype(np.int32)
    return x[:, rows][:, :, cols]


class FPN(nn.Module):
    """Feature pyramid.

    Attributes:
      channels: output channels of every level.
      norm: ``"none"`` (conv bias) or ``"gn"``.
      dtype: compute dtype.
    """

    channels: int = 256
    norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        """[C2..C5] -> [P2, P3, P4, P5, P6], each [B, h_l, w_l, channels]."""
        cn = {"norm": self.norm, "dtype": self.dtype, "kernel_init": fpn_kernel_init}
        n = len(features)
        last = ConvNorm(self.channels, 1, name=f"inner_{n - 1}", **cn)(features[-1])
        results = [ConvNorm(self.channels, 3, name=f"layer_{n - 1}", **cn)(last)]
        for idx in range(n - 2, -1, -1):
            lateral = ConvNorm(self.channels, 1, name=f"inner_{idx}", **cn)(features[idx])
            last = lateral + upsample_nearest(last, lateral.shape[1:3])
            results.insert(0, ConvNorm(self.channels, 3, name=f"layer_{idx}", **cn)(last))
        results.append(results[-1][:, ::2, ::2])  # P6: max_pool2d(kernel 1, stride 2)
        return results
