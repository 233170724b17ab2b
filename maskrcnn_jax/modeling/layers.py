"""Building blocks shared by the backbone, FPN and heads (NHWC, HWIO kernels).

Convolutions take torch's symmetric padding explicitly (Flax's ``"SAME"``
pads stride-2 convs asymmetrically, which would not match converted
weights). Parameters are float32; compute runs in the module's ``dtype``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def torch_kaiming_uniform(fan_axes: tuple[int, ...] = (0, 1, 2)):
    """torch's default conv / linear weight init (kaiming_uniform, a=sqrt(5))."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[a] for a in fan_axes)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# torchvision's ResNet / mask head init: kaiming_normal(mode="fan_out", relu).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def group_norm_groups(channels: int, groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``groups`` (32 for real widths)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int) -> jnp.ndarray:
    """[B, H, W, Cin] x [kh, kw, Cin, Cout] -> [B, H', W', Cout], torch padding.

    A 1x1 kernel without padding is a matrix product over the channels of every
    ``stride``-th pixel, and is computed as one: XLA:CPU runs the kernel gradient of
    that product 1.2-2.6x faster than the convolution's (``experiments/bench_block.py``),
    with the same value up to float summation order.

    A strided convolution with a larger kernel takes its gradients on the CPU as
    the sum of ``stride**2`` stride-1 convolutions (:func:`strided_conv2d_by_phases`).
    """
    kernel = kernel.astype(x.dtype)
    if kernel.shape[:2] == (1, 1) and padding == 0:
        if stride != 1:
            x = x[:, ::stride, ::stride]
        b, h, w, c = x.shape
        y = x.reshape(b * h * w, c) @ kernel[0, 0]
        return y.reshape(b, h, w, kernel.shape[-1])
    if stride != 1 and jax.default_backend() == "cpu":
        return _strided_conv2d(x, kernel, stride, padding)
    return _lax_conv2d(x, kernel, stride, padding)


def _lax_conv2d(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def strided_conv2d_by_phases(
    x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: int
) -> jnp.ndarray:
    """:func:`conv2d` as a sum of ``stride**2`` stride-1 convolutions (same shapes).

    Output pixel i reads padded input rows ``stride * i + a`` for taps a; the taps
    with ``a % stride == r`` read every ``stride``-th row of phase r
    (``x_pad[r::stride]``), which is a stride-1 convolution of that phase with the
    kernel's rows ``r::stride``; likewise for columns. The same products, summed in
    another order. Not faster forward on XLA:CPU, but the gradients of stride-1
    convolutions take its fast path, where a strided one's input gradient (a
    convolution of the zero-dilated output gradient) and kernel gradient do not:
    ResNet-50's layer2 3x3 at [2, 200, 272, 128] took 277 / 373 ms for the input /
    kernel gradient directly and 136 / 184 ms this way (``experiments/bench_block.py``).

    Args:
      x: [B, H, W, Cin]; kernel: [kh, kw, Cin, Cout] in x's dtype; stride, padding:
        the same on both axes (static).

    Returns:
      [B, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, Cout].
    """
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    # Padded on the far side by `stride` more, so that every phase holds its rows.
    xp = jnp.pad(x, ((0, 0), (padding, padding + stride), (padding, padding + stride), (0, 0)))
    out = None
    for ry in range(min(stride, kh)):
        for rx in range(min(stride, kw)):
            sub = kernel[ry::stride, rx::stride]  # [ky, kx, Cin, Cout]
            ky, kx = sub.shape[:2]
            phase = xp[:, ry::stride, rx::stride][:, : ho + ky - 1, : wo + kx - 1]
            y = conv2d(phase, sub, 1, 0)
            out = y if out is None else out + y
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv2d(x, kernel, stride, padding):
    """XLA's strided convolution forward; gradients from :func:`strided_conv2d_by_phases`."""
    return _lax_conv2d(x, kernel, stride, padding)


def _strided_fwd(x, kernel, stride, padding):
    return _lax_conv2d(x, kernel, stride, padding), (x, kernel)


def _strided_bwd(stride, padding, residuals, dy):
    # The phases' forward value is unused here; XLA drops it.
    _, vjp = jax.vjp(lambda a, w: strided_conv2d_by_phases(a, w, stride, padding), *residuals)
    return vjp(dy)


_strided_conv2d.defvjp(_strided_fwd, _strided_bwd)


_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_canonical_grads(x: jnp.ndarray, kernel: jnp.ndarray, padding: int) -> jnp.ndarray:
    """:func:`conv2d` at stride 1, its two gradients written as NHWC/HWIO convolutions.

    The value and both gradients are those of :func:`conv2d` (only float
    summation order may differ). Why: XLA:CPU rewrites the gradient
    convolutions JAX emits (kernel gradient: ``f01b_i01o->01bf``) into the
    form its fast convolution kernel takes only in a program's top-level
    computation. Inside a ``lax.switch`` branch or a loop body it leaves them
    to a naive loop: measured 100x slower for the kernel gradient of a
    [256, 14, 14, 64] 3x3 conv (5.9 s against 0.058 s), 4x for the input
    gradient. The mask head runs in such a branch (``mask_head_prefixes``).

    Args:
      x: [B, H, W, Cin]; kernel: [k, k, Cin, Cout] (cast to x's dtype);
      padding: the same on every side (static).

    Returns:
      [B, H + 2p - k + 1, W + 2p - k + 1, Cout].
    """
    return conv2d(x, kernel, 1, padding)


def _conv_fwd(x, kernel, padding):
    return conv2d(x, kernel, 1, padding), (x, kernel)


def _conv_bwd(padding, residuals, dy):
    x, kernel = residuals
    k = kernel.shape[0]
    w = kernel.astype(x.dtype)
    dy = dy.astype(x.dtype)
    # dx = dy correlated with the kernel flipped in space, Cin and Cout swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # [k, k, Cout, Cin]
    q = k - 1 - padding
    dx = jax.lax.conv_general_dilated(dy, w_t, (1, 1), ((q, q), (q, q)), dimension_numbers=_NHWC)
    # dw[a, c, i, o] = sum_{b, y, x} x_pad[b, y + a, x + c, i] dy[b, y, x, o]: Cin as the
    # batch, B as the contracted features, dy as a kernel the size of the output.
    lhs = x.transpose(3, 1, 2, 0)  # [Cin, H, W, B]
    rhs = dy.transpose(1, 2, 0, 3)  # [H', W', B, Cout]
    pad = ((padding, padding), (padding, padding))
    dw = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), pad, dimension_numbers=_NHWC)
    return dx, dw.transpose(1, 2, 0, 3).astype(kernel.dtype)  # [k, k, Cin, Cout]


conv2d_canonical_grads.defvjp(_conv_fwd, _conv_bwd)


class ConvNorm(nn.Module):
    """Conv followed by a normalisation, optionally ReLU.

    ``norm``: ``"frozen_bn"`` (no conv bias; the frozen scale is folded into
    the kernel), ``"gn"`` (no conv bias; GroupNorm with trainable affine) or
    ``"none"`` (conv bias).

    Variables: params ``kernel [k, k, Cin, Cout]``; plus ``bias [Cout]`` for
    ``"none"``, ``gn/{scale,bias}`` for ``"gn"``; for ``"frozen_bn"`` the
    constants ``scale`` and ``bias [Cout]`` (``weight / sqrt(running_var + eps)``
    and ``beta - running_mean * scale``, written by the converter; identity
    when fresh), never trained.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None  # default: kernel_size // 2
    norm: str = "none"
    relu: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = None  # default: torch's conv init
    # Stride 1 only: gradients as plain convolutions (conv2d_canonical_grads), for
    # layers that run inside a lax.switch branch on the CPU (the mask head).
    canonical_grads: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, Cin] -> [B, H', W', features]."""
        k = self.kernel_size
        pad = k // 2 if self.padding is None else self.padding
        if self.canonical_grads and self.stride != 1:
            raise ValueError(f"canonical_grads needs stride 1, got {self.stride}")

        def conv(x, w):
            if self.canonical_grads:
                return conv2d_canonical_grads(x, w, pad)
            return conv2d(x, w, self.stride, pad)

        init = self.kernel_init or torch_kaiming_uniform()
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        if self.norm == "frozen_bn":
            # Folded batch norm: y = conv(x, w) * scale + bias = conv(x, w * scale) + bias.
            shape = (self.features,)
            scale = self.variable("constants", "scale", jnp.ones, shape, jnp.float32).value
            bias = self.variable("constants", "bias", jnp.zeros, shape, jnp.float32).value
            y = conv(x, kernel * scale) + bias.astype(self.dtype)
        elif self.norm == "gn":
            y = conv(x, kernel)
            y = nn.GroupNorm(
                num_groups=group_norm_groups(self.features),
                epsilon=1e-5,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="gn",
            )(y)
        elif self.norm == "none":
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = conv(x, kernel) + bias.astype(self.dtype)
        else:
            raise ValueError(f"norm must be 'frozen_bn', 'gn' or 'none', got {self.norm!r}")
        return nn.relu(y) if self.relu else y


class Dense(nn.Module):
    """Linear layer with torch's default init; float32 params, ``dtype`` compute."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = None
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., Din] -> [..., features]."""
        init = self.kernel_init or torch_kaiming_uniform(fan_axes=(0,))
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
