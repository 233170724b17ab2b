"""RoIPool (Girshick, 2015): max over integer bins of a quantised box.

Equal to ``torchvision.ops.roi_pool`` (its CPU kernel), forward and gradient:

* Box corners are scaled by ``spatial_scale`` in float32 and rounded half away
  from zero (C ``round``; ``jnp.round`` rounds half to even, and the common
  ``floor(|x| + 0.5)`` is wrong for the largest float below 0.5). End corners
  are inclusive: a box is ``round(x2 * s) - round(x1 * s) + 1`` pixels wide,
  at least 1 (malformed boxes become 1 x 1).
* Bin ``ph`` covers rows ``[floor(ph * bin_h), ceil((ph + 1) * bin_h))`` plus
  the box start, clipped to ``[0, H]``, with ``bin_h = roi_h / out_h`` in
  float32; columns likewise. Bins overlap by a pixel where ``bin_h`` is not
  an integer. An empty bin (wholly outside the map) gives 0.
* A bin's value is the max of its pixels, ignoring NaN and values not above
  ``finfo(dtype).min`` (torchvision starts from ``-FLT_MAX`` with a strict
  ``>``); a non-empty bin with no such value gives ``finfo.min`` and no
  gradient.
* A bin's gradient goes to one pixel: the first maximum in torchvision's scan
  order (rows outer, columns inner). Autodiff of ``max`` would split it among
  ties, so the op has a ``jax.custom_vjp`` whose backward scatter-adds each
  bin's cotangent (in float32) to the argmax recorded by the forward. Boxes
  get no gradient, as in torchvision.

Algorithm (static shapes, no per-box loop; cost independent of box sizes):

1. Per level, a sparse table of row maxima along W: for ``k = 0 .. log2 W``,
   ``T_k[h, w] = max(x[h, w : w + 2**k])`` and its first column, built in
   ``log2 W`` elementwise passes, ties kept on the left.
2. Stage 1, per box and bin column ``[w0, w1)``: with ``k = floor(log2(w1 -
   w0))`` the two blocks ``T_k[:, w0]`` and ``T_k[:, w1 - 2**k]`` cover the
   bin, so two gathers of an ``[H, C]`` slab give every row's max over the bin
   and its first column (the left block wins ties, so it is the first).
3. Stage 2, per bin: the rows of stage 1 are folded in increasing order,
   those outside the bin masked to ``-inf``, keeping (value, ``h * W +
   column``) under "larger value, then smaller index": the first maximum in
   row-major order, which is torchvision's argmax. A static loop over the
   tallest level's rows (unrolled up to 64 rows, which XLA fuses into one
   elementwise loop over the output; a ``lax.scan`` beyond).

All levels share one code path, as in ``roi_align_levels``: the level tables
are concatenated (rows padded with ``-inf`` to the tallest level) and each box
reads its own level's table through an offset.

Memory and compute, with ``L`` levels, per image (``C`` channels, ``R`` boxes,
``H0 x W0`` the largest level, ``K_l = floor(log2 W_l) + 1``):

* tables: ``sum_l K_l * W_l * H0 * C`` values plus as many column indices
  (int16 while every W < 32768): about ``1.7 * K_0`` maps the size of the
  largest level. For the COCO model's P2..P5 of an 800 x 1088 input (P2 = 200 x
  272, C = 256): 9 + 4 + 1.75 + 0.75 P2-sized maps, 0.86 GB values + 0.43 GB
  indices.
* stage 1: ``[R, out_w, H0, C]`` values and columns from ``4 * R * out_w``
  gathered slabs; for 512 boxes at 7 x 7 on that map 183 M elements each
  (0.7 GB + 0.37 GB).
* stage 2: ``R * out_h * out_w * H0 * C`` compare-selects (1.3 G for the case
  above) into the ``[R, out_h, out_w, C]`` output; nothing of size
  ``[R, out_h, out_w, H, W, C]`` or ``[R, out_w, H, W, C]`` exists.
* residual for the backward: the argmax, int32 ``[B, R, out_h, out_w, C]``;
  the backward is one scatter-add into ``[B, N * C]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LevelShapes = Sequence[tuple[int, int]]

# Rounded box corners are clamped to +-2**24 feature pixels before the integer
# arithmetic. torchvision converts them to C int unchecked (undefined beyond
# int range); within the clamp every step here is the same as its kernel.
_MAX_COORD = float(2**24)


def _output_size(size: int | Sequence[int]) -> tuple[int, int]:
    out = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(out) != 2 or any(int(s) != s or s < 1 for s in out):
        raise ValueError(f"output_size must be an int >= 1 or (out_h, out_w), got {size!r}")
    return int(out[0]), int(out[1])


def round_half_away(x: jnp.ndarray) -> jnp.ndarray:
    """C ``round``: nearest integer, halves away from zero. Exact in float.

    ``floor(|x| + 0.5)`` rounds 0.49999997 up (the sum rounds to 1.0); the
    fractional part ``|x| - floor(|x|)`` is exact, so compare that instead.
    """
    a = jnp.abs(x)
    r = jnp.floor(a)
    r = r + (a - r >= 0.5).astype(x.dtype)
    return jnp.sign(x) * r


def box_bins(
    boxes: jnp.ndarray,
    spatial_scale: jnp.ndarray | float,
    output_size: tuple[int, int],
    height: jnp.ndarray | int,
    width: jnp.ndarray | int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Integer bin extents of boxes, torchvision's ``roi_pool`` rules.

    Elementwise over boxes by broadcasting (not vmap), so that the divisions
    are array by array; see the comment on the divisors.

    Args:
      boxes: [..., 4] xyxy, absolute input pixels.
      spatial_scale: scalar or [...] feature pixels per input pixel.
      output_size: static (out_h, out_w).
      height, width: scalar or [...] int size of each box's feature map.

    Returns:
      hstart, hend: [..., out_h] int32 rows ``[hstart, hend)`` in ``[0, height]``.
      wstart, wend: [..., out_w] int32 columns, likewise in ``[0, width]``.
      A bin with ``hend <= hstart`` or ``wend <= wstart`` is empty.
    """
    out_h, out_w = output_size
    scale = jnp.asarray(spatial_scale, jnp.float32)[..., None]
    corners = boxes.astype(jnp.float32) * scale  # the kernel's float product
    corners = jnp.nan_to_num(corners, nan=0.0, posinf=_MAX_COORD, neginf=-_MAX_COORD)
    corners = jnp.clip(round_half_away(corners), -_MAX_COORD, _MAX_COORD).astype(jnp.int32)
    x1, y1, x2, y2 = (corners[..., i : i + 1] for i in range(4))  # [..., 1] each
    roi_w = jnp.maximum(x2 - x1 + 1, 1).astype(jnp.float32)
    roi_h = jnp.maximum(y2 - y1 + 1, 1).astype(jnp.float32)
    # torchvision's floor/ceil see the correctly rounded quotient roi / count
    # (3 / 7 * 7 == 3.0, whereas 3 * (1 / 7) * 7 ceils to 4). XLA rewrites a
    # division by a constant or by a broadcast scalar into a multiplication by
    # the reciprocal, so the divisors enter as full arrays through an
    # optimization barrier, which it does not see through.
    roi_h, roi_w, div_h, div_w = jax.lax.optimization_barrier(
        (
            roi_h,
            roi_w,
            jnp.full(roi_h.shape, out_h, jnp.float32),
            jnp.full(roi_w.shape, out_w, jnp.float32),
        )
    )

    def axis_bins(start, roi_size, divisor, count, size):
        bin_size = roi_size / divisor  # [..., 1]
        p = jnp.arange(count, dtype=jnp.float32)
        lo = jnp.floor(p * bin_size).astype(jnp.int32) + start
        hi = jnp.ceil((p + 1.0) * bin_size).astype(jnp.int32) + start
        size = jnp.asarray(size, jnp.int32)[..., None]
        return jnp.clip(lo, 0, size), jnp.clip(hi, 0, size)

    hstart, hend = axis_bins(y1, roi_h, div_h, out_h, height)
    wstart, wend = axis_bins(x1, roi_w, div_w, out_w, width)
    return hstart, hend, wstart, wend


def _considered(x: jnp.ndarray) -> jnp.ndarray:
    """-inf where torchvision's strict ``>`` from -FLT_MAX never picks x (NaN too)."""
    return jnp.where(x > jnp.finfo(x.dtype).min, x, jnp.array(-jnp.inf, x.dtype))


def _row_max_table(fmap: jnp.ndarray, height: int, col_dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sparse table of row maxima along W, rows padded to ``height``.

    Args:
      fmap: [B, H, W, C] with ignored values already -inf.
      height: static H0 >= H; rows H..H0-1 are -inf.
      col_dtype: integer dtype of the column indices.

    Returns:
      value: [B, K * W, height * C], row ``k * W + w`` holding
        ``max(fmap[:, :, w : w + 2**k])`` (the part inside the map) for
        k < K = floor(log2 W) + 1.
      column: same shape, ``col_dtype``: the first column of that maximum.
    """
    b, h, w, c = fmap.shape
    v = jnp.swapaxes(fmap, 1, 2)  # [B, W, H, C]
    v = jnp.pad(v, ((0, 0), (0, 0), (0, height - h), (0, 0)), constant_values=-jnp.inf)
    a = jnp.broadcast_to(jnp.arange(w, dtype=col_dtype)[None, :, None, None], v.shape)
    values, columns = [v], [a]
    span = 1
    while 2 * span <= w:
        # Block [w, w + 2 span) is [w, w + span) followed by [w + span, w + 2 span).
        pad = ((0, 0), (0, span), (0, 0), (0, 0))
        right_v = jnp.pad(v[:, span:], pad, constant_values=-jnp.inf)
        right_a = jnp.pad(a[:, span:], pad)
        take_right = right_v > v  # ties stay left: the first column
        v = jnp.where(take_right, right_v, v)
        a = jnp.where(take_right, right_a, a)
        values.append(v)
        columns.append(a)
        span *= 2
    k = len(values)
    value = jnp.stack(values, axis=1).reshape(b, k * w, height * c)
    column = jnp.stack(columns, axis=1).reshape(b, k * w, height * c)
    return value, column


def _select_max_first(x, y):
    """(value, index) pairs: the larger value; on equal values the smaller index.

    A total order on pairs, so every grouping of the reduction gives the same
    pair (deterministic whatever order XLA reduces in).
    """
    (xv, xi), (yv, yi) = x, y
    take_y = (yv > xv) | ((yv == xv) & (yi < xi))
    return jnp.where(take_y, yv, xv), jnp.where(take_y, yi, xi)


# Stage 2 visits the rows of the tallest level one by one. Up to this many rows
# the loop is unrolled, which XLA fuses into one elementwise loop over the
# output (on a 2-core CPU, 2.3x faster than a scan and 6x faster than a
# variadic reduce over rows); beyond it a lax.scan keeps the compile time flat (200 unrolled rows
# take half a minute to compile).
_UNROLL_MAX_ROWS = 64


def _bin_rows_max(
    m1: jnp.ndarray,
    col: jnp.ndarray,
    hstart: jnp.ndarray,
    hend: jnp.ndarray,
    width: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Stage 2: for each bin, the max over rows ``[hstart, hend)`` of stage 1.

    Rows are folded in increasing order with :func:`_select_max_first` on
    (value, ``h * W + column``), so among equal maxima the smallest flat
    index, i.e. the first maximum in row-major order, is kept.

    Args:
      m1: [B, R, ow, H0, C] per row, the max over each bin column (-inf: none).
      col: [B, R, ow, H0, C] int, the first column of that max.
      hstart, hend: [B, R, oh] int32 row ranges.
      width: [B, R, 1] int32 width of each box's level.

    Returns:
      value: [B, R, oh, ow, C], -inf where the bin has no candidate.
      index: [B, R, oh, ow, C] int32 ``h * W + w`` of the first maximum.
    """
    b, r, out_w, h0, c = m1.shape
    out_h = hstart.shape[-1]
    width = width[:, :, :, None, None]  # [B, R, 1, 1, 1]

    def fold(acc, h, m1_h, col_h):  # m1_h, col_h: [B, R, ow, C]
        in_row = ((hstart <= h) & (h < hend))[:, :, :, None, None]  # [B, R, oh, 1, 1]
        v = jnp.where(in_row, m1_h[:, :, None], jnp.array(-jnp.inf, m1.dtype))
        i = jnp.broadcast_to(h * width + col_h[:, :, None].astype(jnp.int32), v.shape)
        return _select_max_first(acc, (v, i))

    acc = (
        jnp.full((b, r, out_h, out_w, c), -jnp.inf, m1.dtype),
        jnp.full((b, r, out_h, out_w, c), np.iinfo(np.int32).max, jnp.int32),
    )
    if h0 <= _UNROLL_MAX_ROWS:
        for h in range(h0):
            acc = fold(acc, h, m1[:, :, :, h], col[:, :, :, h])
        return acc
    rows = (jnp.arange(h0, dtype=jnp.int32), jnp.moveaxis(m1, 3, 0), jnp.moveaxis(col, 3, 0))
    return jax.lax.scan(lambda acc, xs: (fold(acc, *xs), None), acc, rows)[0]


def _pool_forward(features, boxes, levels, level_shapes, spatial_scales, output_size):
    """Values [B, R, oh, ow, C] and flat argmax rows [B, R, oh, ow, C] (-1: none)."""
    b, _, c = features.shape
    r = boxes.shape[1]
    out_w = output_size[1]
    h0 = max(h for h, _ in level_shapes)
    col_dtype = jnp.int16 if max(w for _, w in level_shapes) < 2**15 else jnp.int32

    # Static level geometry: offset of each level in [N] and in the tables.
    heights = np.array([h for h, _ in level_shapes], np.int32)
    widths = np.array([w for _, w in level_shapes], np.int32)
    pixel_offsets = np.concatenate([[0], np.cumsum(heights * widths)[:-1]]).astype(np.int32)
    num_k = np.floor(np.log2(widths)).astype(np.int32) + 1
    table_offsets = np.concatenate([[0], np.cumsum(num_k * widths)[:-1]]).astype(np.int32)

    # torchvision's strict `>` from -FLT_MAX never picks NaN or values <= -FLT_MAX.
    x = jnp.where(features > jnp.finfo(features.dtype).min, features, -jnp.inf)
    values, columns = [], []
    for (h, w), offset in zip(level_shapes, pixel_offsets):
        v, a = _row_max_table(x[:, offset : offset + h * w].reshape(b, h, w, c), h0, col_dtype)
        values.append(v)
        columns.append(a)
    table_v = jnp.concatenate(values, axis=1)  # [B, sum K_l W_l, H0 * C]
    table_a = jnp.concatenate(columns, axis=1)

    # A level outside [0, L) pools nothing (its rows are made empty).
    lvl = jnp.clip(levels, 0, len(level_shapes) - 1)
    known = (levels >= 0) & (levels < len(level_shapes))  # [B, R]
    width = jnp.asarray(widths)[lvl][..., None]  # [B, R, 1]
    hstart, hend, wstart, wend = box_bins(
        boxes,
        jnp.asarray(np.array(spatial_scales, np.float32))[lvl],
        output_size,
        jnp.asarray(heights)[lvl],
        width[..., 0],
    )  # [B, R, oh] x 2, [B, R, ow] x 2
    hend = jnp.where(known[..., None], hend, hstart)

    # Stage 1: blocks [w0, w0 + 2**k) and [w1 - 2**k, w1) cover bin column
    # [w0, w1); each is one [H0 * C] row of the table.
    k = 31 - jax.lax.clz(jnp.maximum(wend - wstart, 1))  # floor(log2 width), [B, R, ow]
    base = jnp.asarray(table_offsets)[lvl][..., None] + k * width
    left = base + jnp.clip(wstart, 0, width - 1)
    right = base + jnp.clip(wend - (1 << k), 0, width - 1)
    gather = jax.vmap(lambda table, rows: table[rows])  # per image
    left_v, right_v = gather(table_v, left), gather(table_v, right)  # [B, R, ow, H0 * C]
    take_right = right_v > left_v  # ties: the left block holds the first column
    m1 = jnp.where(take_right, right_v, left_v).reshape(b, r, out_w, h0, c)
    col = jnp.where(take_right, gather(table_a, right), gather(table_a, left))
    col = col.reshape(b, r, out_w, h0, c)  # int16 while W < 2**15: half the bytes

    # Stage 2: per bin, the max over its rows of stage 1.
    value, index = _bin_rows_max(m1, col, hstart, hend, width)  # [B, R, oh, ow, C] each

    found = value > -jnp.inf
    empty = (hend <= hstart)[:, :, :, None, None] | (wend <= wstart)[:, :, None, :, None]
    lowest = jnp.finfo(features.dtype).min
    value = jnp.where(empty, jnp.zeros((), value.dtype), jnp.where(found, value, lowest))
    pixel = jnp.asarray(pixel_offsets)[lvl][:, :, None, None, None] + index
    return value, jnp.where(found & ~empty, pixel, -1)


def _roi_pool_flat_fwd(features, boxes, levels, level_shapes, spatial_scales, output_size):
    value, index = _pool_forward(features, boxes, levels, level_shapes, spatial_scales, output_size)
    return value, (index, boxes)


def _roi_pool_flat_bwd(level_shapes, spatial_scales, output_size, residual, cotangent):
    index, boxes = residual
    b, c = index.shape[0], index.shape[-1]
    n = sum(h * w for h, w in level_shapes)
    # Row-major position in [N, C]; -1 (no argmax) goes out of bounds: dropped.
    chan = jnp.arange(c, dtype=jnp.int32)
    flat = jnp.where(index >= 0, index * c + chan, n * c).reshape(b, -1)

    def scatter(flat, ct):
        return jnp.zeros((n * c,), jnp.float32).at[flat].add(ct, mode="drop")

    grad = jax.vmap(scatter)(flat, cotangent.astype(jnp.float32).reshape(b, -1))
    # The cotangent has the output's dtype, which is the features'.
    return (
        grad.reshape(b, n, c).astype(cotangent.dtype),
        jnp.zeros_like(boxes),
        np.zeros(index.shape[:2], jax.dtypes.float0),
    )


def _roi_pool_flat(features, boxes, levels, level_shapes, spatial_scales, output_size):
    return _pool_forward(features, boxes, levels, level_shapes, spatial_scales, output_size)[0]


_roi_pool_flat = jax.custom_vjp(_roi_pool_flat, nondiff_argnums=(3, 4, 5))
_roi_pool_flat.defvjp(_roi_pool_flat_fwd, _roi_pool_flat_bwd)
# Jitted as a whole: called eagerly, its unrolled loops would otherwise run
# (and compile) op by op. Inside an outer jit this is inlined.
_roi_pool_flat = jax.jit(_roi_pool_flat, static_argnums=(3, 4, 5))


def roi_pool_levels(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    spatial_scales: Sequence[float],
    output_size: int | Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> jnp.ndarray:
    """RoIPool on flattened feature levels, one level chosen per box.

    The contract of :func:`maskrcnn_jax.ops.roi_align.roi_align_levels`, so it
    can be registered as a multilevel pooler implementation.

    Args:
      features: [B, N, C] levels flattened row-major and concatenated (as
        ``flatten_levels`` does), N = sum of H_l * W_l.
      boxes: [B, R, 4] xyxy, absolute input pixels; padded boxes are allowed
        (they pool what torchvision would pool for them; mask them). No
        gradient flows to boxes.
      levels: [B, R] int, index into ``level_shapes`` of each box's level. A
        box whose level is outside ``[0, L)`` gives 0 and no gradient.
      level_shapes: static ((H_0, W_0), ...).
      spatial_scales: static feature pixels per input pixel, per level.
      output_size: out_h, out_w (or one int).
      sampling_ratio: accepted for the contract and ignored (RoIPool takes
        every pixel of a bin).
      aligned: accepted for the contract and ignored (RoIPool has no
        half-pixel variant; its corners are rounded to pixels).

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.

    Raises:
      ValueError: naming the first argument whose shape does not fit.
    """
    del sampling_ratio, aligned
    output_size = _output_size(output_size)
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, C], got {tuple(features.shape)}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"boxes must be [B={features.shape[0]}, R, 4], got {tuple(boxes.shape)}")
    if levels.shape != boxes.shape[:2]:
        raise ValueError(f"levels must be {tuple(boxes.shape[:2])}, got {tuple(levels.shape)}")
    if len(level_shapes) != len(spatial_scales) or not level_shapes:
        raise ValueError(
            f"{len(level_shapes)} level shapes but {len(spatial_scales)} spatial scales"
        )
    shapes = tuple((int(h), int(w)) for h, w in level_shapes)
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"level_shapes must be positive (H, W), got {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != features.shape[1]:
        raise ValueError(f"level_shapes cover {total} pixels but features have {features.shape[1]}")
    scales = tuple(float(s) for s in spatial_scales)
    return _roi_pool_flat(
        features,
        jax.lax.stop_gradient(boxes),
        levels.astype(jnp.int32),
        shapes,
        scales,
        output_size,
    )


def roi_pool(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
) -> jnp.ndarray:
    """RoIPool on one feature map, equal to ``torchvision.ops.roi_pool``.

    Args:
      features: [B, H, W, C] (NHWC).
      boxes: [B, R, 4] xyxy, absolute input pixels; padded boxes are allowed
        (they pool what torchvision would pool for them; mask them). No
        gradient flows to boxes.
      output_size: out_h, out_w (or one int).
      spatial_scale: feature pixels per input pixel (1 / stride).

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got {tuple(features.shape)}")
    b, h, w, c = features.shape
    if boxes.ndim != 3:
        raise ValueError(f"boxes must be [B={b}, R, 4], got {tuple(boxes.shape)}")
    levels = jnp.zeros(boxes.shape[:2], jnp.int32)
    return roi_pool_levels(
        features.reshape(b, h * w, c), boxes, levels, [(h, w)], [spatial_scale], output_size
    )
