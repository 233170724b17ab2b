"""Fused RoIAlign as a Pallas kernel: the ``roi_align_levels`` contract of ``poolers.py``.

The vmap reference in ``roi_align.py`` gathers every bilinear tap of every
output bin through XLA. Here one kernel program takes a block of output bins
(consecutive bins of consecutive boxes) and a block of channels, and for each of
the K = 4 * sampling_ratio**2 taps of a bin gathers the feature rows, weights
them and accumulates in float32; the block is written once. Nothing but the
output leaves the kernel.

Layout (structure of JAX's own Pallas ops, e.g. ``pallas/ops/gpu/layer_norm.py``):

* :func:`_roi_align_kernel` works on refs;
* :func:`roi_align_pool` is the ``pallas_call`` with ``interpret`` static;
* :func:`roi_align_pool_reference` is the same pooling in plain jnp;
* :func:`roi_align_levels_pallas` is the jitted public op, differentiable
  through a ``jax.custom_vjp`` whose backward is the transpose of the
  reference pooling (one XLA scatter-add, no Pallas kernel), so its gradient
  is the reference's: equal within 1e-5 in float32. For bfloat16 features it
  scatter-adds in float32 and rounds once, where the vmap reference
  scatter-adds in bfloat16, so ours is the more accurate of the two.
* :class:`BlockSizes` holds the tile sizes.

Geometry is not re-derived: the per-box tap indices and weights come from
:func:`roi_geometry.box_samples` (torchvision's rules), computed in plain jnp
outside the kernel as ``index, weight: [K, P]``, P = B * R * out_h * out_w
bins, with the image offset ``b * N`` folded into the row index of the
``[B * N, C]`` features. A "block of boxes" is therefore a block of
``block_bins`` consecutive bins; counting bins rather than boxes keeps every
tile a power of two (Triton needs it) although a box has 7 * 7 = 49 bins.

Padding: P is padded to a multiple of ``block_bins`` with taps of weight 0 on
row 0, and C to a multiple of ``block_c`` with zero channels (a copy of the
features, made only when C is not a multiple; the model's C = 256 is), so the
kernel has no ragged edges and needs no masks. Padded outputs are sliced off.

Backends:

* CPU: ``interpret=True`` (the default there, ``interpret=None`` = auto). The
  tests check forward and gradient against the reference in this mode.
* GPU: lowered through Pallas-Triton. The features are passed whole (no
  BlockSpec), which Triton sees as a pointer, and ``features_ref[rows, cols]``
  with an int32 row vector and a channel slice is a gather load of a
  ``[block_bins, block_c]`` tile. The tests also lower the kernel to Triton
  IR for CUDA on a CPU-only host (``jax.jit(...).trace(...).lower(
  lowering_platforms=("cuda",))``), which checks that every op in it has a
  Triton lowering. By hand (not in the tests), that Triton IR compiled to
  sm_90 PTX and cubin with the ``triton`` 3.8 pip package (sampling_ratio 1,
  2 and 3; f32 64x128 tiles at 4 warps: 119 registers, no spills). Running it
  on a GPU, and its speed, were not verified.
* TPU: not supported (Mosaic has no vector gather from HBM); a
  ``NotImplementedError`` says to use ``roi_align_impl="reference"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from maskrcnn_jax.ops.roi_geometry import (
    LevelShapes,
    box_samples,
    check_levels_args,
    level_geometry,
)

# Above this many taps per bin (sampling_ratio > 2) the tap loop is a
# ``fori_loop`` instead of being unrolled, to bound the kernel's code size.
_MAX_UNROLLED_TAPS = 16


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the RoIAlign kernel.

    Attributes:
      block_bins: output bins (box, y, x) per program; a power of two.
      block_c: channels per program; a power of two. It is lowered to
        ``next_power_of_2(C)`` for smaller C so small maps are not padded far.
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton pipeline stages (GPU only; None = Pallas's default).
    """

    block_bins: int = 64
    block_c: int = 128
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_bins", "block_c"):
            value = getattr(self, name)
            if not isinstance(value, int) or not _is_power_of_2(value):
                raise ValueError(f"{name} must be a power of two, got {value!r}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def _roi_align_kernel(index_ref, weight_ref, features_ref, out_ref, *, num_taps: int):
    """One (bin block, channel block) tile of RoIAlign.

    Args (refs):
      index_ref: [K, block_bins] int32 rows of the flat features, tap-major so
        that each tap's row vector is one contiguous load.
      weight_ref: [K, block_bins] float32 bilinear weight * 1 / sampling_ratio**2.
      features_ref: [M, C_pad] the whole flat feature array (gathered from).
      out_ref: [block_bins, block_c] output tile.
    """
    block_c = out_ref.shape[1]
    c0 = pl.multiple_of(pl.program_id(1) * block_c, block_c)
    cols = pl.ds(c0, block_c)

    def tap(k, acc):
        rows = index_ref[k, :]  # [block_bins]
        w = weight_ref[k, :]  # [block_bins]
        values = features_ref[rows, cols].astype(jnp.float32)  # gather [block_bins, block_c]
        return acc + w[:, None] * values

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    if num_taps <= _MAX_UNROLLED_TAPS:
        for k in range(num_taps):  # same summation order as the reference
            acc = tap(k, acc)
    else:
        acc = jax.lax.fori_loop(0, num_taps, tap, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _channel_block(block_sizes: BlockSizes, channels: int) -> int:
    return min(block_sizes.block_c, pl.next_power_of_2(channels))


def roi_align_pool(
    features: jnp.ndarray,
    index: jnp.ndarray,
    weight: jnp.ndarray,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jnp.ndarray:
    """Weighted sum of gathered feature rows, as the Pallas kernel.

    out[p, c] = sum_k weight[k, p] * features[index[k, p], c], accumulated in
    float32 in tap order.

    Args:
      features: [M, C] any float dtype.
      index: [K, P] int32 in [0, M).
      weight: [K, P] float32.

    Returns:
      [P, C] in the dtype of ``features``.
    """
    c = features.shape[1]
    k, p = index.shape
    block_bins = block_sizes.block_bins
    block_c = _channel_block(block_sizes, c)
    p_pad = pl.cdiv(p, block_bins) * block_bins
    c_pad = pl.cdiv(c, block_c) * block_c
    if p_pad != p:  # padded bins: weight 0 on row 0
        index = jnp.pad(index, ((0, 0), (0, p_pad - p)))
        weight = jnp.pad(weight, ((0, 0), (0, p_pad - p)))
    if c_pad != c:
        features = jnp.pad(features, ((0, 0), (0, c_pad - c)))
    grid = (p_pad // block_bins, c_pad // block_c)
    out = pl.pallas_call(
        functools.partial(_roi_align_kernel, num_taps=k),
        out_shape=jax.ShapeDtypeStruct((p_pad, c_pad), features.dtype),
        grid=grid,
        in_specs=[
            pl.BlockSpec((k, block_bins), lambda i, j: (0, i)),
            pl.BlockSpec((k, block_bins), lambda i, j: (0, i)),
            pl.no_block_spec,  # whole array: a pointer on Triton, gathered from
        ],
        out_specs=pl.BlockSpec((block_bins, block_c), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="roi_align",
    )(index, weight.astype(jnp.float32), features)
    return out[:p, :c]


def roi_align_pool_reference(
    features: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray
) -> jnp.ndarray:
    """:func:`roi_align_pool` in plain jnp: one gather and a contraction.

    The same form as the tangent of the reference's pooling
    (``roi_align._pool_einsum``);
    its transpose is the backward of :func:`roi_align_levels_pallas`.

    Args:
      features: [M, C]; index, weight: [K, P].

    Returns:
      [P, C] in the dtype of ``features``.
    """
    taps = features.at[index].get(mode="promise_in_bounds").astype(jnp.float32)  # [K, P, C]
    return jnp.einsum("kp,kpc->pc", weight.astype(jnp.float32), taps).astype(features.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pool(features, index, weight, block_sizes: BlockSizes, interpret: bool):
    return roi_align_pool(features, index, weight, block_sizes, interpret)


def _pool_fwd(features, index, weight, block_sizes, interpret):
    out = roi_align_pool(features, index, weight, block_sizes, interpret)
    # ``features`` is kept only for the shape and dtype of its cotangent; the
    # backbone holds it for its own backward anyway.
    return out, (features, index, weight)


def _pool_bwd(block_sizes, interpret, residuals, g):
    del block_sizes, interpret
    features, index, weight = residuals
    # The transpose of the float32 reference pooling: one scatter-add of the
    # weighted cotangent into a float32 buffer, rounded to the features' dtype
    # once at the end.
    f32 = jax.ShapeDtypeStruct(features.shape, jnp.float32)
    transpose = jax.linear_transpose(lambda f: roi_align_pool_reference(f, index, weight), f32)
    (dfeatures,) = transpose(g.astype(jnp.float32))
    return dfeatures.astype(features.dtype), None, None  # boxes get no gradient


_pool.defvjp(_pool_fwd, _pool_bwd)


@functools.partial(
    jax.jit,
    static_argnames=(
        "level_shapes",
        "spatial_scales",
        "output_size",
        "sampling_ratio",
        "aligned",
        "block_sizes",
        "interpret",
    ),
)
def _roi_align_levels(
    features,
    boxes,
    levels,
    level_shapes,
    spatial_scales,
    output_size,
    sampling_ratio,
    aligned,
    block_sizes,
    interpret,
):
    b, n, c = features.shape
    r = boxes.shape[1]
    out_h, out_w = output_size
    geometry = level_geometry(level_shapes, spatial_scales)

    def per_box(box, level):
        return box_samples(box, level, *geometry, output_size, sampling_ratio, aligned)

    boxes = jax.lax.stop_gradient(boxes)
    # [B, R, oh, ow, K] each
    index, weight = jax.vmap(jax.vmap(per_box))(boxes, levels.astype(jnp.int32))
    index = index + (jnp.arange(b, dtype=jnp.int32) * n)[:, None, None, None, None]
    k = index.shape[-1]
    index = index.reshape(-1, k).T  # [K, P], P = B * R * oh * ow
    weight = jax.lax.stop_gradient(weight).reshape(-1, k).T
    out = _pool(features.reshape(b * n, c), index, weight, block_sizes, interpret)  # [P, C]
    return out.reshape(b, r, out_h, out_w, c)


def roi_align_levels_pallas(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    spatial_scales: Sequence[float],
    output_size: int | Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """RoIAlign on flattened feature levels with the fused Pallas kernel.

    Same arguments, results and gradient as :func:`roi_align.roi_align_levels`.

    Args:
      features: [B, N, C] levels flattened by :func:`roi_geometry.flatten_levels`.
      boxes: [B, R, 4] xyxy, absolute input pixels. No gradient flows to boxes.
      levels: [B, R] int, index into ``level_shapes`` of each box's level.
      level_shapes: static ((H_0, W_0), ...).
      spatial_scales: static feature pixels per input pixel, per level.
      output_size: out_h, out_w (or one int).
      sampling_ratio: static samples per bin along each axis (>= 1).
      aligned: shift by half a pixel (Detectron2's ROIAlignV2).
      block_sizes: kernel tiles; None = :meth:`BlockSizes.get_default`.
      interpret: run the kernel in the Pallas interpreter; None = on CPU only.

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.
    """
    output_size, sampling_ratio = check_levels_args(
        features, boxes, levels, level_shapes, output_size, sampling_ratio
    )
    level_shapes = tuple((int(h), int(w)) for h, w in level_shapes)
    spatial_scales = tuple(float(s) for s in spatial_scales)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default()
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend == "tpu":
        raise NotImplementedError(
            "the Pallas RoIAlign kernel lowers through Triton (GPU) only; Mosaic TPU "
            "has no vector gather from HBM. Use roi_align_impl='reference' on TPU."
        )
    return _roi_align_levels(
        features,
        boxes,
        levels,
        level_shapes,
        spatial_scales,
        output_size,
        sampling_ratio,
        bool(aligned),
        block_sizes,
        bool(interpret),
    )
