"""RoIAlign (He et al., 2017), the vmap reference implementation.

Written for one box and vectorised with ``jax.vmap`` over boxes and images.
It equals ``torchvision.ops.roi_align`` (and ``MultiScaleRoIAlign``) including
its edge rules; the geometry (sample points, tap indices and weights, the
flattened level layout) is in ``roi_geometry.py``, shared with the other
implementations. Here the taps are pooled by XLA gathers.

This module implements the ``roi_align_levels`` contract that every RoI
pooling implementation follows; the public single- and multi-level entry
points, level assignment and the choice of implementation are in
``poolers.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.roi_geometry import (
    LevelShapes,
    box_samples,
    check_levels_args,
    level_geometry,
)


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
    torchvision). Not differentiated (inference), the output has one consumer and
    the gathers fuse into it; differentiated, the JVP writes it once
    (:func:`_pool_materialised`).
    """
    return jax.vmap(_pool_unrolled)(features, index, weight)


# Boxes pooled per trip of the forward's loop: every box in one of two trips.
_POOL_TRIPS = 2


def _pool_materialised(features, index, weight):
    """``vmap(_pool_unrolled)``, its output written to memory once by a loop of two trips.

    Used where the output is differentiated (the JVP of :func:`_pool`). Without a
    gradient (inference) the plain ``vmap`` is cheaper: the loop's output buffer is
    zero-filled first (25 ms for the R50 box head's 1000 boxes).

    Why a loop: the output's sum of K gathered taps is cheap elementwise work, so
    XLA:CPU fuses it into *every* consumer, each then reading the K gathers (which
    it materialises one by one) instead of the output. In the train step one
    consumer is the transposed copy of the mask head's input for its first conv's
    kernel gradient: with 16 taps that copy took 0.44 s of a 1.2 s shapes step, and
    the 16 gathers 12 ms each instead of one fused loop. A loop's result is a
    buffer no consumer can fuse through (an ``optimization_barrier`` is removed
    before fusion; ``lax.map`` over images would stack along the batch axis,
    which the train step shards). The boxes go in two halves (R padded to even),
    written in place, so the output keeps its [B, R, ...] layout.

    Args:
      features: [B, N, C]; index, weight: [B, R, oh, ow, K].

    Returns:
      [B, R, oh, ow, C] float32.
    """
    r = index.shape[1]
    pool = jax.vmap(_pool_unrolled)
    if r < _POOL_TRIPS:
        return pool(features, index, weight)
    pad = -r % _POOL_TRIPS
    if pad:
        pad_width = [(0, 0), (0, pad)] + [(0, 0)] * (index.ndim - 2)
        index, weight = jnp.pad(index, pad_width), jnp.pad(weight, pad_width)
    part = (r + pad) // _POOL_TRIPS

    def trip(i, out):
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * part, part, axis=1)
        pooled = pool(features, take(index), take(weight))
        return jax.lax.dynamic_update_slice_in_dim(out, pooled, i * part, axis=1)

    out = jnp.zeros((*index.shape[:-1], features.shape[-1]), jnp.float32)
    out = jax.lax.fori_loop(0, _POOL_TRIPS, trip, out)
    return out[:, :r]


@_pool.defjvp
def _pool_jvp(primals, tangents):
    features, index, weight = primals
    dfeatures = tangents[0]
    out = _pool_materialised(features, index, weight)
    # Linear in dfeatures; JAX transposes it into one scatter-add for the VJP.
    return out, jax.vmap(_pool_einsum)(dfeatures, index, weight)


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
      features: [B, N, C] levels flattened by
        :func:`~maskrcnn_jax.ops.roi_geometry.flatten_levels`,
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
