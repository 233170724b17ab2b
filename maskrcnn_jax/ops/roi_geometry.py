"""RoI geometry shared by every RoI pooling implementation.

Where each box samples the feature map, worked out once in plain jnp:
argument checks, the per-level layout of the flattened features, the sample
points of a box (torchvision's RoIAlign rules, He et al., 2017) and the flat
indices and bilinear weights of their taps. The implementations
(``roi_align.py``, ``roi_align_pallas.py``, ...) import this module and differ
only in how they pool the taps; ``poolers.py`` chooses among them. The mask
targets (``targets.py``) resample one-channel crops with the same sample points
as dense per-axis matrices (:func:`bilinear_matrix`).

Layout: all FPN levels share one code path. The levels are flattened into a
single ``[B, N, C]`` array (N = sum of H_l * W_l, :func:`flatten_levels`) and
each box reads from the level it is assigned to through an offset
(:func:`level_geometry`), the layout of tensorflow/tpu's
``multilevel_crop_and_resize``, so multi-level pooling costs no more than
single-level pooling and no per-level masking is needed.

Edge rules (torchvision's): sample points more than one pixel outside the map
contribute zero, points in the last pixel row or column are clamped to it, and
with ``aligned=False`` a box is at least one feature pixel wide.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

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


def check_levels_args(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    output_size: int | Sequence[int],
    sampling_ratio: int,
) -> tuple[tuple[int, int], int]:
    """Validates the arguments of the ``roi_align_levels`` contract.

    Args:
      features: [B, N, C]; boxes: [B, R, 4]; levels: [B, R];
      level_shapes: ((H_0, W_0), ...) whose pixels sum to N.
      output_size: out_h, out_w (or one int).
      sampling_ratio: static int >= 1.

    Returns:
      (output_size as (out_h, out_w), sampling_ratio as int).

    Raises:
      ValueError: naming the first argument whose shape does not fit.
    """
    sampling_ratio = check_sampling_ratio(sampling_ratio)
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, C], got {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be [B={features.shape[0]}, R, 4], got {tuple(boxes.shape)}")
    if levels.shape != boxes.shape[:2]:
        raise ValueError(f"levels must be {tuple(boxes.shape[:2])}, got {tuple(levels.shape)}")
    total = sum(int(h) * int(w) for h, w in level_shapes)
    if total != features.shape[1]:
        raise ValueError(f"level_shapes cover {total} pixels but features have {features.shape[1]}")
    return _pair(output_size), sampling_ratio


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


def bilinear_matrix(coords: jnp.ndarray, size: int) -> jnp.ndarray:
    """Dense bilinear interpolation along one axis, averaged over each bin's samples.

    Row ``i`` holds the weights that :func:`bilinear_axis` gives ``coords[i]``'s
    samples, each divided by their count ``g`` and scattered onto the ``size``
    pixels, so ``matrix @ column`` is RoIAlign along that axis (torchvision's
    rules, edges included).

    Args:
      coords: [n, g] float sample positions (``sample_points``'s ys or xs).
      size: static int, pixels along the axis.

    Returns:
      [n, size] float32.
    """
    low, high, w_low, w_high = bilinear_axis(coords, jnp.int32(size))
    pixels = jnp.arange(size)
    onto = w_low[..., None] * (low[..., None] == pixels) + w_high[..., None] * (
        high[..., None] == pixels
    )  # [n, g, size]
    return onto.sum(axis=1) / coords.shape[-1]


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
    # Built in bin order, [out_h, out_w, g (rows), g (columns), 4], so that the reshape to
    # [out_h, out_w, K] needs no axis moved (XLA fuses the arithmetic into whichever
    # copy writes the taps; the shapes step's 28x28 mask targets spend about 45 ms
    # here either way).
    rows = jnp.stack([y0, y0, y1, y1], axis=-1)[:, None, :, None, :]  # [oh, 1, g, 1, 4]
    cols = jnp.stack([x0, x1, x0, x1], axis=-1)[None, :, None, :, :]  # [1, ow, 1, g, 4]
    wrow = jnp.stack([wy0, wy0, wy1, wy1], axis=-1)[:, None, :, None, :]
    wcol = jnp.stack([wx0, wx1, wx0, wx1], axis=-1)[None, :, None, :, :]
    index = offsets[level] + rows * width + cols  # [oh, ow, g, g, 4]
    weight = wrow * wcol / (g * g)
    out_h, out_w = output_size
    return index.reshape(out_h, out_w, -1), weight.reshape(out_h, out_w, -1)


def level_geometry(level_shapes: LevelShapes, spatial_scales: Sequence[float]):
    """Per-level arrays of the flattened feature layout.

    Args:
      level_shapes: static ((H_0, W_0), ...), L levels.
      spatial_scales: static feature pixels per input pixel, L values.

    Returns:
      (heights, widths, offsets, scales), each [L]: int32 H_l, W_l, the first
      row of level l in the flat [N, C] map, and float32 scales.
    """
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
    """Concatenates levels [B, H_l, W_l, C] into [B, sum H_l*W_l, C].

    Args:
      features: per level [B, H_l, W_l, C], same B and C.

    Returns:
      flat: [B, N, C], N = sum of H_l * W_l, level 0 first, each row-major.
      level_shapes: [(H_0, W_0), ...] static ints.
    """
    b, c = features[0].shape[0], features[0].shape[-1]
    shapes = []
    for i, f in enumerate(features):
        if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != c:
            raise ValueError(f"level {i} must be [{b}, H, W, {c}], got {tuple(f.shape)}")
        shapes.append((int(f.shape[1]), int(f.shape[2])))
    flat = jnp.concatenate([f.reshape(b, -1, c) for f in features], axis=1)
    return flat, shapes
