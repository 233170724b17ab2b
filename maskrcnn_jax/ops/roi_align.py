"""RoIAlign (He et al., 2017): bilinear samples at exact, unquantised points.

The reference implementation is written for one box and vectorised with
``jax.vmap`` over boxes and images. It equals ``torchvision.ops.roi_align``
(and ``MultiScaleRoIAlign``) including its edge rules: sample points more than
one pixel outside the map contribute zero, points in the last pixel row or
column are clamped to it, and with ``aligned=False`` a box is at least one
feature pixel wide.

All FPN levels share one code path: the levels are flattened into a single
``[B, N, C]`` array (N = sum of H_l * W_l) and each box reads from the level it
is assigned to through an offset, so multi-level pooling costs no more than
single-level pooling and no per-level masking is needed (the layout of
tensorflow/tpu's ``multilevel_crop_and_resize``). The Pallas kernel in
``roi_align_pallas.py`` implements the same :func:`roi_align_levels` contract.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.boxes import box_area

LevelShapes = Sequence[tuple[int, int]]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def check_sampling_ratio(sampling_ratio: int) -> int:
    """Refuses the adaptive ``sampling_ratio=0``: its sample count depends on the
    box size, which has no static shape under ``jax.jit``."""
    if int(sampling_ratio) != sampling_ratio or sampling_ratio < 1:
        raise ValueError(
            f"sampling_ratio must be a static int >= 1, got {sampling_ratio!r} "
            "(the adaptive sampling_ratio=0 has a data-dependent sample count)"
        )
    return int(sampling_ratio)


def bilinear_axis(coords: jnp.ndarray, size: jnp.ndarray):
    """Bilinear corners and weights along one axis, torchvision's rules.

    Args:
      coords: [...] float sample positions along the axis, in feature pixels
        (pixel centres at integer positions).
      size: scalar int, number of pixels along the axis.

    Returns:
      low, high: [...] int32 pixel indices in [0, size - 1].
      w_low, w_high: [...] float weights; both zero where the sample lies more
        than one pixel outside the map (``coords < -1`` or ``coords > size``).
    """
    size_f = size.astype(coords.dtype)
    inside = (coords >= -1.0) & (coords <= size_f)
    c = jnp.maximum(coords, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    c = jnp.where(at_edge, low.astype(coords.dtype), c)
    frac = c - low.astype(coords.dtype)
    inside = inside.astype(coords.dtype)
    return low, high, (1.0 - frac) * inside, frac * inside


def sample_points(
    box: jnp.ndarray,
    spatial_scale: jnp.ndarray,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sample coordinates of one box, in feature pixels.

    Args:
      box: [4] xyxy in input pixels.
      spatial_scale: scalar, feature pixels per input pixel.

    Returns:
      ys: [out_h, sampling_ratio], xs: [out_w, sampling_ratio].
    """
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    box = box.astype(jnp.float32)
    x1 = box[0] * spatial_scale - offset
    y1 = box[1] * spatial_scale - offset
    roi_w = box[2] * spatial_scale - offset - x1
    roi_h = box[3] * spatial_scale - offset - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = roi_h / out_h
    bin_w = roi_w / out_w
    sub = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5)[None, :]
    ys = y1 + jnp.arange(out_h, dtype=jnp.float32)[:, None] * bin_h + sub * bin_h / sampling_ratio
    xs = x1 + jnp.arange(out_w, dtype=jnp.float32)[:, None] * bin_w + sub * bin_w / sampling_ratio
    return ys, xs


def box_samples(
    box: jnp.ndarray,
    level: jnp.ndarray,
    heights: jnp.ndarray,
    widths: jnp.ndarray,
    offsets: jnp.ndarray,
    scales: jnp.ndarray,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Flat feature indices and weights of every bilinear tap of one box.

    Each output bin averages ``sampling_ratio**2`` samples of four taps each,
    so K = 4 * sampling_ratio**2 (index, weight) pairs per bin; the weights of
    a bin already include the 1 / sampling_ratio**2 of the average.

    Args:
      box: [4] xyxy input pixels.
      level: scalar int, which level the box reads.
      heights, widths, offsets, scales: [L] level geometry from
        :func:`level_geometry`.

    Returns:
      index: [out_h, out_w, K] int32 rows of the flattened [N, C] features.
      weight: [out_h, out_w, K] float32.
    """
    g = sampling_ratio
    width = widths[level]
    ys, xs = sample_points(box, scales[level], output_size, g, aligned)
    y0, y1, wy0, wy1 = bilinear_axis(ys, heights[level])  # [out_h, g] each
    x0, x1, wx0, wx1 = bilinear_axis(xs, width)  # [out_w, g] each
    rows = jnp.stack([y0, y0, y1, y1], axis=-1)[:, :, None, None, :]  # [oh, g, 1, 1, 4]
    cols = jnp.stack([x0, x1, x0, x1], axis=-1)[None, None, :, :, :]  # [1, 1, ow, g, 4]
    wrow = jnp.stack([wy0, wy0, wy1, wy1], axis=-1)[:, :, None, None, :]
    wcol = jnp.stack([wx0, wx1, wx0, wx1], axis=-1)[None, None, :, :, :]
    index = offsets[level] + rows * width + cols  # [oh, g, ow, g, 4]
    weight = wrow * wcol / (g * g)
    to_bins = lambda x: jnp.moveaxis(x, 2, 1).reshape(x.shape[0], x.shape[2], -1)
    return to_bins(index), to_bins(weight)


def _pool_unrolled(features: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """sum_k weight[..., k] * features[index[..., k]] as K separate gathers.

    Written as a chain of adds (K is static and small) so that XLA fuses the
    gathers and the weighted sum into one loop that writes only the output,
    instead of materialising [..., K, C] samples.

    Args:
      features: [N, C]; index, weight: [..., K].

    Returns:
      [..., C] float32.
    """
    out = None
    for k in range(index.shape[-1]):
        tap = features.at[index[..., k]].get(mode="promise_in_bounds")
        term = weight[..., k, None] * tap.astype(jnp.float32)
        out = term if out is None else out + term
    return out


def _pool_einsum(features: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """Same value as :func:`_pool_unrolled`, as one gather and a contraction.

    Its transpose is a single scatter-add, the fast backward on CPU (the
    unrolled form would transpose into K scatters).
    """
    # Cast before the gather so that the transpose accumulates in float32.
    taps = features.astype(jnp.float32).at[index].get(mode="promise_in_bounds")
    return jnp.einsum("...k,...kc->...c", weight, taps)


@jax.custom_jvp
def _pool(features: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    """Pools [B, N, C] features at [B, R, oh, ow, K] taps -> [B, R, oh, ow, C] f32.

    Differentiable in ``features`` only (boxes get no gradient, as in
    torchvision).
    """
    return jax.vmap(_pool_unrolled)(features, index, weight)


@_pool.defjvp
def _pool_jvp(primals, tangents):
    features, index, weight = primals
    dfeatures = tangents[0]
    out = jax.vmap(_pool_unrolled)(features, index, weight)
    # Linear in dfeatures; JAX transposes it into one scatter-add for the VJP.
    return out, jax.vmap(_pool_einsum)(dfeatures, index, weight)


def level_geometry(level_shapes: LevelShapes, spatial_scales: Sequence[float]):
    """Per-level arrays (heights, widths, offsets into the flat map, scales)."""
    if len(level_shapes) != len(spatial_scales):
        raise ValueError(
            f"{len(level_shapes)} level shapes but {len(spatial_scales)} spatial scales"
        )
    heights = np.array([h for h, _ in level_shapes], np.int32)
    widths = np.array([w for _, w in level_shapes], np.int32)
    offsets = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
    scales = np.array(spatial_scales, np.float32)
    return jnp.asarray(heights), jnp.asarray(widths), jnp.asarray(offsets), jnp.asarray(scales)


def flatten_levels(features: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, list[tuple[int, int]]]:
    """Concatenates levels [B, H_l, W_l, C] into [B, sum H_l*W_l, C]."""
    b, c = features[0].shape[0], features[0].shape[-1]
    shapes = []
    for i, f in enumerate(features):
        if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != c:
            raise ValueError(f"level {i} must be [{b}, H, W, {c}], got {tuple(f.shape)}")
        shapes.append((int(f.shape[1]), int(f.shape[2])))
    flat = jnp.concatenate([f.reshape(b, -1, c) for f in features], axis=1)
    return flat, shapes


def check_levels_args(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    output_size: int | Sequence[int],
    sampling_ratio: int,
) -> tuple[tuple[int, int], int]:
    """Validates :func:`roi_align_levels` arguments (shared with the Pallas kernel).

    Returns:
      (output_size as (out_h, out_w), sampling_ratio as int).

    Raises:
      ValueError: naming the first argument whose shape does not fit.
    """
    sampling_ratio = check_sampling_ratio(sampling_ratio)
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, C], got {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"boxes must be [B={features.shape[0]}, R, 4], got {tuple(boxes.shape)}"
        )
    if levels.shape != boxes.shape[:2]:
        raise ValueError(f"levels must be {tuple(boxes.shape[:2])}, got {tuple(levels.shape)}")
    total = sum(int(h) * int(w) for h, w in level_shapes)
    if total != features.shape[1]:
        raise ValueError(f"level_shapes cover {total} pixels but features have {features.shape[1]}")
    return _pair(output_size), sampling_ratio


def roi_align_levels(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    spatial_scales: Sequence[float],
    output_size: int | Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> jnp.ndarray:
    """RoIAlign on flattened feature levels, one level chosen per box.

    Args:
      features: [B, N, C] levels flattened by :func:`flatten_levels`,
        N = sum of H_l * W_l.
      boxes: [B, R, 4] xyxy, absolute input pixels. No gradient flows to boxes.
      levels: [B, R] int, index into ``level_shapes`` of each box's level.
      level_shapes: static ((H_0, W_0), ...).
      spatial_scales: static feature pixels per input pixel, per level.
      output_size: out_h, out_w (or one int).
      sampling_ratio: static samples per bin along each axis (>= 1).
      aligned: shift by half a pixel (Detectron2's ROIAlignV2).

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.
    """
    output_size, sampling_ratio = check_levels_args(
        features, boxes, levels, level_shapes, output_size, sampling_ratio
    )
    geometry = level_geometry(level_shapes, spatial_scales)
    boxes = jax.lax.stop_gradient(boxes)

    def per_box(box, level):
        return box_samples(box, level, *geometry, output_size, sampling_ratio, aligned)

    index, weight = jax.vmap(jax.vmap(per_box))(boxes, levels.astype(jnp.int32))
    weight = jax.lax.stop_gradient(weight)
    out = _pool(features, index, weight)  # [B, R, out_h, out_w, C]
    return out.astype(features.dtype)


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> jnp.ndarray:
    """RoIAlign on one feature map, equal to ``torchvision.ops.roi_align``.

    Args:
      features: [B, H, W, C] (NHWC).
      boxes: [B, R, 4] xyxy, absolute input pixels; padded boxes are allowed
        (their output is whatever torchvision gives for them; mask it).
      output_size: out_h, out_w (or one int).
      spatial_scale: feature pixels per input pixel (1 / stride).
      sampling_ratio: static samples per bin along each axis (>= 1).
      aligned: shift boxes by -0.5 pixel (pixel-centre convention).

    Returns:
      [B, R, out_h, out_w, C]
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got {tuple(features.shape)}")
    flat, shapes = flatten_levels([features])
    levels = jnp.zeros(boxes.shape[:2], jnp.int32)
    return roi_align_levels(
        flat, boxes, levels, shapes, [spatial_scale], output_size, sampling_ratio, aligned
    )


def assign_levels(
    boxes: jnp.ndarray,
    min_level: int = 2,
    max_level: int = 5,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jnp.ndarray:
    """FPN level of each box (Lin et al., 2017, eq. 1), as torchvision's LevelMapper.

    level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps),
    clamped to [min_level, max_level].

    Args:
      boxes: [..., 4] xyxy input pixels.

    Returns:
      [...] int32 level index relative to ``min_level`` (0 for P2).
    """
    s = jnp.sqrt(box_area(boxes.astype(jnp.float32)))
    lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_scale) + eps)
    lvl = jnp.clip(jnp.nan_to_num(lvl, nan=min_level), min_level, max_level)
    return (lvl - min_level).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    strides: Sequence[int] = (4, 8, 16, 32),
    sampling_ratio: int = 2,
    aligned: bool = False,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    impl: str = "reference",
    **impl_kwargs,
) -> jnp.ndarray:
    """Pools each box from its FPN level, as ``torchvision.ops.MultiScaleRoIAlign``.

    Args:
      features: per level [B, H_l, W_l, C], finest first (P2..P5).
      boxes: [B, R, 4] xyxy input pixels.
      output_size: out_h, out_w (or one int).
      strides: stride of each level; level l has scale 1 / strides[l] and is
        FPN level log2(strides[l]).
      impl: ``"reference"`` (vmap) or ``"pallas"`` (fused kernel).

    Returns:
      [B, R, out_h, out_w, C]
    """
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    min_level = int(round(math.log2(strides[0])))
    max_level = int(round(math.log2(strides[-1])))
    levels = assign_levels(boxes, min_level, max_level, canonical_scale, canonical_level)
    flat, shapes = flatten_levels(features)
    scales = [1.0 / s for s in strides]
    fn = get_roi_align_levels(impl)
    return fn(flat, boxes, levels, shapes, scales, output_size, sampling_ratio, aligned, **impl_kwargs)


def get_roi_align_levels(impl: str):
    """Returns the :func:`roi_align_levels` implementation named ``impl``.

    ``"reference"``: the vmap implementation here; ``"pallas"``: the fused
    kernel; ``"auto"``: Pallas on GPU, the reference on CPU and TPU.
    """
    if impl == "auto":
        # The kernel gathers rows from HBM, which Mosaic (TPU) cannot lower.
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "reference":
        return roi_align_levels
    if impl == "pallas":
        from maskrcnn_jax.ops import roi_align_pallas

        return roi_align_pallas.roi_align_levels_pallas
    raise ValueError(f"roi_align impl must be 'reference', 'pallas' or 'auto', got {impl!r}")
