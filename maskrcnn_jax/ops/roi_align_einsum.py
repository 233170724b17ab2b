"""Gather-free RoIAlign: separable one-hot weight matrices contracted by einsum.

Same contract as :func:`maskrcnn_jax.ops.roi_align.roi_align_levels`, written
for TPUs, which are slow at the gathers of the vmap reference and at the
scatter-add of its backward but fast at matrix products (the form of
tensorflow/tpu's ``spatial_transform_ops.py``, TF Model Garden's
``_selective_crop_and_resize(..., use_einsum_gather=True)`` and fvlm's
``two_step_gather_per_level``).

RoIAlign's sample grid of a box is a tensor product of ``out_h * g`` rows and
``out_w * g`` columns (g = ``sampling_ratio``), and bilinear interpolation is
separable, so the output of one box on level l is

    out[i, j, c] = sum_{y, x} Wy[i, y] * Wx[j, x] * F_l[y, x, c]

with ``Wy: [out_h, H_l]`` and ``Wx: [out_w, W_l]``. Row i of ``Wy`` holds the
bilinear weights of the g sample rows of output row i, summed over the
sampling sub-axis (the 1 / g**2 of the bin average is folded into ``Wy``).
The weights are built from :func:`sample_points` and :func:`bilinear_axis`, the
reference's own geometry and edge rules, by comparing a pixel iota with the
tap indices (``iota == low`` times ``w_low`` plus ``iota == high`` times
``w_high``): no gather. Boxes assigned to another level get all-zero rows, so
every level is contracted with every box and the sum over levels is the
assigned level's value. The contraction runs over the longer axis first, which
gives the smaller intermediate (``[k, out_w, H_l, C]`` when W_l > H_l), and
both products are written so that neither operand needs a transposed copy
(see :func:`_contract`).

Cost: every box is contracted with every level, about
``2 * R * out * H_l * W_l * C`` flops per image and level (P2 dominates; 2 x 512
boxes at 14x14 on a 200x336x256 P2 is ~0.5 TFLOP forward). That is what the MXU
is for; on a CPU this is far slower than the reference.

Memory: contracting all R boxes at once materialises the intermediate
``[B, R, out_w, H_l, C]`` (2 x 512 x 14 x 200 x 256 float32 = 2.9 GB on P2).
Boxes are therefore contracted ``box_chunk`` at a time under ``lax.map`` (R is
padded up to a multiple with boxes of level -1, whose rows are zero), which
bounds the intermediate to ``B * box_chunk * out_w * H_l * C``. Windows are
not cropped per box with ``dynamic_slice``: under vmap that is a gather, and its
transpose a scatter. Each chunk is rematerialised (``jax.checkpoint``), so the
backward keeps no per-chunk weights: it rebuilds them from the boxes.

Gradient: plain autodiff of the einsums. The output is linear in the features,
so the backward is the transposed contractions (matrix products again,
accumulated over chunks in the scan's carry; the forward products are not
recomputed): no scatter, no gather. Boxes get no gradient.

Precision: products accumulate in float32 (``preferred_element_type``). For
float32 features the contractions run at ``Precision.HIGHEST`` so that TPUs and
GPUs do not round the operands to bfloat16 / TF32 (parity with torchvision is
1e-4). For bfloat16 features the weight matrices and the intermediate are
rounded to bfloat16, the MXU's native input, and the output is rounded once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.roi_geometry import (
    LevelShapes,
    bilinear_axis,
    check_levels_args,
    sample_points,
)

# Boxes per image contracted at once. At COCO shapes (P2 200x336, C=256, 14x14
# output) the float32 intermediate is 64 * 14 * 200 * 256 * 4 B = 183 MB per
# image; larger chunks make larger matrix products but cost memory linearly.
DEFAULT_BOX_CHUNK = 64


def _axis_weights(coords: jnp.ndarray, size: int, scale: float) -> jnp.ndarray:
    """One-hot-weighted interpolation matrix of one axis of one box.

    Args:
      coords: [out, g] sample positions in feature pixels (from
        :func:`sample_points`).
      size: static number of pixels along the axis.
      scale: factor folded into every weight (1 / g**2 on one axis, 1 on the
        other).

    Returns:
      [out, size] float32; row i = sum over the g samples of output row i of
      their two bilinear taps, as ``(iota == low) * w_low + (iota == high) *
      w_high`` (the two taps coincide at the last pixel, where ``w_high`` is 0).
    """
    low, high, w_low, w_high = bilinear_axis(coords, jnp.int32(size))  # [out, g] each
    iota = jnp.arange(size, dtype=jnp.int32)  # [size]
    onehot = lambda idx, w: jnp.where(idx[..., None] == iota, w[..., None], 0.0)
    taps = onehot(low, w_low) + onehot(high, w_high)  # [out, g, size]
    return taps.sum(axis=1) * scale


def _contract(fmap: jnp.ndarray, w_first: jnp.ndarray, w_second: jnp.ndarray, precision):
    """sum_{a,b} w_first[k, p, a] * w_second[k, q, b] * fmap[a, b, c] -> [k, p, q, c] float32.

    Both products are in the canonical [batch, M, K] x [batch, K, N] form, so
    no operand is transposed (a transposed copy of the intermediate would
    double the memory): the first contracts the leading axis of the map, the
    second makes ``p`` a batch axis by broadcasting ``w_second`` over it (a
    tensor ``out_p / C`` times the size of the intermediate).

    Args:
      fmap: [A, B, C] one level of one image, the axis to contract first leading.
      w_first: [k, out_a, A]; w_second: [k, out_b, B], in the compute dtype.
    """
    dot = lambda spec, x, y: jnp.einsum(
        spec, x, y, precision=precision, preferred_element_type=jnp.float32
    )
    k, out_a, _ = w_first.shape
    t = dot("kpa,abc->kpbc", w_first, fmap)  # [k, out_a, B, C]
    w_second = jnp.broadcast_to(w_second[:, None], (k, out_a, *w_second.shape[1:]))
    return dot("kpqb,kpbc->kpqc", w_second, t.astype(fmap.dtype))  # [k, out_a, out_b, C]


def roi_align_levels_einsum(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    level_shapes: LevelShapes,
    spatial_scales: Sequence[float],
    output_size: int | Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = False,
    *,
    box_chunk: int = DEFAULT_BOX_CHUNK,
    precision: jax.lax.Precision | None = None,
) -> jnp.ndarray:
    """RoIAlign on flattened feature levels without gathers or scatters.

    Equal to :func:`maskrcnn_jax.ops.roi_align.roi_align_levels` (and
    torchvision's ``roi_align`` / ``MultiScaleRoIAlign``) up to float32
    summation order.

    Args:
      features: [B, N, C] levels flattened by ``flatten_levels``,
        N = sum of H_l * W_l.
      boxes: [B, R, 4] xyxy, absolute input pixels. No gradient flows to boxes.
        Padded boxes are allowed (their output is what torchvision gives for
        them; mask it).
      levels: [B, R] int, index into ``level_shapes`` of each box's level. A box
        whose level is outside [0, L) pools zeros.
      level_shapes: static ((H_0, W_0), ...).
      spatial_scales: static feature pixels per input pixel, per level.
      output_size: out_h, out_w (or one int).
      sampling_ratio: static samples per bin along each axis (>= 1).
      aligned: shift by half a pixel (Detectron2's ROIAlignV2).
      box_chunk: static boxes per image contracted at once (>= 1); bounds the
        intermediate to [B, box_chunk, out, min(H_l, W_l), C] float32 (out =
        out_w when W_l > H_l, else out_h). Values above R are clipped to R.
      precision: of the products. None: ``HIGHEST`` for float32 features
        (TPUs would otherwise round the operands to bfloat16, GPUs to TF32,
        which breaks parity with torchvision), ``DEFAULT`` for 16-bit ones.

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.

    Raises:
      ValueError: a shape does not fit (see ``check_levels_args``), or
        ``box_chunk`` is not an int >= 1.
    """
    (out_h, out_w), g = check_levels_args(
        features, boxes, levels, level_shapes, output_size, sampling_ratio
    )
    if len(level_shapes) != len(spatial_scales):
        raise ValueError(
            f"{len(level_shapes)} level shapes but {len(spatial_scales)} spatial scales"
        )
    if isinstance(box_chunk, bool) or int(box_chunk) != box_chunk or box_chunk < 1:
        raise ValueError(f"box_chunk must be a static int >= 1, got {box_chunk!r}")
    r = boxes.shape[1]
    c = features.shape[-1]
    shapes = [(int(h), int(w)) for h, w in level_shapes]
    scales = [float(s) for s in spatial_scales]
    dtype = features.dtype
    if precision is None:
        wide = dtype.itemsize >= 4
        precision = jax.lax.Precision.HIGHEST if wide else jax.lax.Precision.DEFAULT
    k = max(1, min(int(box_chunk), r))
    n_chunks = math.ceil(r / k) if r else 0

    def per_box(box, level, *, lvl, shape, scale):
        """[out_h, H_l], [out_w, W_l] weights of one box on level ``lvl`` (zero if not its level)."""
        ys, xs = sample_points(box, jnp.float32(scale), (out_h, out_w), g, aligned)
        on_level = (level == lvl).astype(jnp.float32)
        wy = _axis_weights(ys, shape[0], on_level / (g * g))
        wx = _axis_weights(xs, shape[1], 1.0)
        return wy.astype(dtype), wx.astype(dtype)

    def per_image(feats, img_boxes, img_levels):
        # feats: [N, C]; img_boxes: [R, 4]; img_levels: [R]
        level_maps, offset = [], 0
        for h, w in shapes:
            fmap = feats[offset : offset + h * w].reshape(h, w, c)  # [H_l, W_l, C]
            # The longer axis leads: it is contracted first (smaller intermediate).
            level_maps.append(fmap.transpose(1, 0, 2) if w > h else fmap)
            offset += h * w
        pad = n_chunks * k - r
        img_boxes = jnp.pad(img_boxes, ((0, pad), (0, 0)))
        img_levels = jnp.pad(img_levels, (0, pad), constant_values=-1)

        # Rematerialised: the backward rebuilds the chunk's weights from its boxes
        # instead of saving them (with the broadcast of _contract) for every chunk.
        # Nothing else is recomputed: the output is linear in the features, so the
        # backward needs no forward activation.
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def per_chunk(chunk):
            chunk_boxes, chunk_levels = chunk  # [k, 4], [k]
            out = jnp.zeros((k, out_h, out_w, c), jnp.float32)
            for lvl, (fmap, (h, w), scale) in enumerate(zip(level_maps, shapes, scales)):
                level_weights = functools.partial(per_box, lvl=lvl, shape=(h, w), scale=scale)
                wy, wx = jax.vmap(level_weights)(chunk_boxes, chunk_levels)
                # wy: [k, out_h, H_l], wx: [k, out_w, W_l]
                if w > h:
                    out_l = _contract(fmap, wx, wy, precision).transpose(0, 2, 1, 3)
                else:
                    out_l = _contract(fmap, wy, wx, precision)
                out = out + out_l  # [k, out_h, out_w, C]
            return out

        chunks = (img_boxes.reshape(n_chunks, k, 4), img_levels.reshape(n_chunks, k))
        out = jax.lax.map(per_chunk, chunks)  # [n_chunks, k, out_h, out_w, C]
        return out.reshape(n_chunks * k, out_h, out_w, c)[:r]

    boxes = jax.lax.stop_gradient(boxes).astype(jnp.float32)
    out = jax.vmap(per_image)(features, boxes, levels.astype(jnp.int32))
    return out.astype(dtype)  # [B, R, out_h, out_w, C]
