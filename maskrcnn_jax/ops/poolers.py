"""RoI poolers: FPN level assignment, multi-level pooling and the implementation registry.

The ops compute one thing; the choice among them is made here, one level up
(detectron2 keeps ``assign_boxes_to_levels`` and ``ROIPooler`` in
``modeling/poolers.py``, apart from ``layers/roi_align.py``). This module
imports every implementation at the top and nothing imports it back.

Every implementation follows one contract, that of
:func:`maskrcnn_jax.ops.roi_align.roi_align_levels`
(:class:`RoIAlignLevels`)::

    fn(features [B, N, C], boxes [B, R, 4], levels [B, R], level_shapes,
       spatial_scales, output_size, sampling_ratio=2, aligned=False, **kwargs)
      -> [B, R, out_h, out_w, C]

with ``features`` flattened by :func:`~maskrcnn_jax.ops.roi_geometry.flatten_levels`
and the geometry taken from ``roi_geometry.py``. To add one: write it in its
own module importing only ``roi_geometry``, import it below and add one entry
to :data:`ROI_ALIGN_IMPLS`; ``impl=`` of :func:`roi_align` and
:func:`multilevel_roi_align`, and the model config's ``roi_align_impl``, then
accept its name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops.anchors import FPN_STRIDES
from maskrcnn_jax.ops.boxes import box_area
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.ops.roi_align_einsum import roi_align_levels_einsum
from maskrcnn_jax.ops.roi_align_pallas import roi_align_levels_pallas
from maskrcnn_jax.ops.roi_geometry import LevelShapes, flatten_levels
from maskrcnn_jax.ops.roi_pool import roi_pool_levels


class RoIAlignLevels(Protocol):
    """The contract of every RoI pooling implementation (see the module docstring)."""

    def __call__(
        self,
        features: jnp.ndarray,
        boxes: jnp.ndarray,
        levels: jnp.ndarray,
        level_shapes: LevelShapes,
        spatial_scales: Sequence[float],
        output_size: int | Sequence[int],
        sampling_ratio: int = 2,
        aligned: bool = False,
    ) -> jnp.ndarray: ...


# name -> implementation of the ``roi_align_levels`` contract.
ROI_ALIGN_IMPLS: dict[str, RoIAlignLevels] = {
    "reference": roi_align_levels,  # vmap + XLA gathers, every backend
    "pallas": roi_align_levels_pallas,  # fused kernel: GPU (Triton), CPU interpreter
    "einsum": roi_align_levels_einsum,  # gather-free one-hot matmuls: TPU (MXU)
}

# The card and date on which `experiments/device_check.py` ran the compiled Pallas kernel
# and found its forward and gradient equal to the reference. Until that has happened,
# "auto" never picks the kernel on a GPU. Proven once: float32 forward bit-equal, gradient
# within 3.4e-6 (H200: 1.3e-5 at 14x14), bfloat16 within a quarter of its tolerance, whole-model detections
# identical; train step as fast as the reference, compiled 3x sooner (README, "GPU and TPU").
PALLAS_PROVEN_ON_GPU: str | None = (
    "NVIDIA H100 80GB HBM3, jax 0.11.2, 2026-11-27; NVIDIA H200, jax 0.11.2, 2026-11-28"
)

# What "auto" picks on each backend (jax.default_backend()).
AUTO_BY_BACKEND = {
    "cpu": "reference",  # measured fastest on CPU (experiments/bench_ops.py)
    # Unproven on TPU hardware: no TPU at hand. It is the form the TPU implementations
    # that reach published AP use (tensorflow/tpu, TF Model Garden, fvlm): row gathers and
    # scatter-adds are slow on TPU, one-hot matmuls run on the MXU.
    "tpu": "einsum",
    "gpu": "pallas" if PALLAS_PROVEN_ON_GPU else "reference",
}

# Not an implementation: picks one for the default backend (resolve_roi_align_impl).
AUTO_IMPL = "auto"


# The model config's ``roi_pooler``: how box and mask features are pooled from the FPN.
# "align" is torchvision's RoIAlign (aligned=False), "align_v2" Detectron2's ROIAlignV2
# (aligned=True, half-pixel shift), "pool" RoIPool (Girshick, 2015; one implementation,
# :func:`~maskrcnn_jax.ops.roi_pool.roi_pool_levels`). ``impl`` names choose among the
# implementations of the two align variants only.
ROI_POOLERS = ("align", "align_v2", "pool")


def roi_align_impl_names() -> tuple[str, ...]:
    """Every valid ``impl`` name: the registered implementations, then ``"auto"``."""
    return (*ROI_ALIGN_IMPLS, AUTO_IMPL)


def resolve_roi_align_impl(impl: str) -> str:
    """Name of the implementation that ``impl`` stands for.

    ``"auto"`` picks only what has been proven on the platform
    (:data:`AUTO_BY_BACKEND`): ``"reference"`` on CPU; ``"einsum"`` on TPU (the
    one exception: unproven on TPU hardware, but the form the TPU anchors use;
    the Pallas kernel gathers rows from HBM, which Mosaic cannot lower);
    ``"pallas"`` on GPU only once :data:`PALLAS_PROVEN_ON_GPU` records the card
    and date on which the device check found the compiled kernel equal to the
    reference, ``"reference"`` until then. Any other registered name stands
    for itself.

    Raises:
      ValueError: one line listing the valid names, if ``impl`` is not one.
    """
    if impl == AUTO_IMPL:
        return AUTO_BY_BACKEND.get(jax.default_backend(), "reference")
    if impl not in ROI_ALIGN_IMPLS:
        names = ", ".join(repr(n) for n in roi_align_impl_names())
        raise ValueError(f"roi_align impl must be one of {names}, got {impl!r}")
    return impl


def get_roi_align_levels(impl: str) -> RoIAlignLevels:
    """The ``roi_align_levels`` implementation named ``impl`` (or chosen by ``"auto"``).

    Raises:
      ValueError: one line listing the valid names, if ``impl`` is not one.
    """
    return ROI_ALIGN_IMPLS[resolve_roi_align_impl(impl)]


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
    impl: str = "reference",
    **impl_kwargs,
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
      impl: a name of :func:`roi_align_impl_names`.
      **impl_kwargs: passed to the implementation (e.g. ``block_sizes`` and
        ``interpret`` for ``"pallas"``).

    Returns:
      [B, R, out_h, out_w, C] in the dtype of ``features``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [B, H, W, C], got {tuple(features.shape)}")
    fn = get_roi_align_levels(impl)
    flat, shapes = flatten_levels([features])
    levels = jnp.zeros(boxes.shape[:2], jnp.int32)
    args = (flat, boxes, levels, shapes, [spatial_scale], output_size, sampling_ratio, aligned)
    return fn(*args, **impl_kwargs)


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
    clamped to [min_level, max_level]. Zero-area (padding) boxes get
    ``min_level``.

    Args:
      boxes: [..., 4] xyxy input pixels.

    Returns:
      [...] int32 level index relative to ``min_level`` (0 for P2).
    """
    s = jnp.sqrt(box_area(boxes.astype(jnp.float32)))
    lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_scale) + eps)
    lvl = jnp.clip(jnp.nan_to_num(lvl, nan=min_level), min_level, max_level)
    return (lvl - min_level).astype(jnp.int32)


def _levels_of(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    strides: Sequence[int],
    canonical_scale: float,
    canonical_level: int,
) -> tuple[jnp.ndarray, jnp.ndarray, list[tuple[int, int]], list[float]]:
    """What every multi-level pooler takes: the flat levels, each box's level, the shapes
    and the scales (1 / stride) of :func:`flatten_levels` and :func:`assign_levels`.

    Args:
      features: per level [B, H_l, W_l, C], finest first.
      boxes: [B, R, 4] xyxy input pixels.
      strides: stride of each level (level l is FPN level log2(strides[l])).
      canonical_scale, canonical_level: of :func:`assign_levels`.

    Returns:
      (flat, levels [B, R] int32, shapes, scales), flat and shapes as
      :func:`flatten_levels` returns them.

    Raises:
      ValueError: if the feature and stride counts differ.
    """
    if len(features) != len(strides):
        raise ValueError(f"{len(features)} feature levels but {len(strides)} strides")
    min_level = round(math.log2(strides[0]))
    max_level = round(math.log2(strides[-1]))
    levels = assign_levels(boxes, min_level, max_level, canonical_scale, canonical_level)
    flat, shapes = flatten_levels(features)
    return flat, levels, shapes, [1.0 / s for s in strides]


def multilevel_roi_align(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    strides: Sequence[int] = FPN_STRIDES[:4],
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
        FPN level log2(strides[l]). Default: P2..P5 of ``FPN_STRIDES``.
      sampling_ratio: static samples per bin along each axis (>= 1).
      aligned: shift boxes by -0.5 pixel (pixel-centre convention).
      canonical_scale, canonical_level: of :func:`assign_levels`.
      impl: a name of :func:`roi_align_impl_names`.
      **impl_kwargs: passed to the implementation (e.g. ``block_sizes`` and
        ``interpret`` for ``"pallas"``).

    Returns:
      [B, R, out_h, out_w, C] in the dtype of the features.
    """
    flat, levels, shapes, scales = _levels_of(
        features, boxes, strides, canonical_scale, canonical_level
    )
    fn = get_roi_align_levels(impl)
    args = (flat, boxes, levels, shapes, scales, output_size, sampling_ratio, aligned)
    return fn(*args, **impl_kwargs)


def multilevel_roi_pool(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    strides: Sequence[int] = FPN_STRIDES[:4],
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
) -> jnp.ndarray:
    """RoIPool of each box from its FPN level (the level assignment of RoIAlign).

    Args:
      features: per level [B, H_l, W_l, C], finest first (P2..P5).
      boxes: [B, R, 4] xyxy input pixels; no gradient flows to them.
      output_size: out_h, out_w (or one int).
      strides: stride of each level, as :func:`multilevel_roi_align`.
      canonical_scale, canonical_level: of :func:`assign_levels`.

    Returns:
      [B, R, out_h, out_w, C] in the dtype of the features: per box
      ``torchvision.ops.roi_pool`` on its level with scale 1 / stride.
    """
    flat, levels, shapes, scales = _levels_of(
        features, boxes, strides, canonical_scale, canonical_level
    )
    return roi_pool_levels(flat, boxes, levels, shapes, scales, output_size)


def multilevel_roi_pooler(
    features: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    strides: Sequence[int] = FPN_STRIDES[:4],
    pooler: str = "align",
    sampling_ratio: int = 2,
    impl: str = "reference",
) -> jnp.ndarray:
    """Multi-level RoI features by the pooler named ``pooler`` (one of :data:`ROI_POOLERS`).

    ``"align"``: :func:`multilevel_roi_align` with ``aligned=False``;
    ``"align_v2"``: the same with ``aligned=True``; ``"pool"``:
    :func:`multilevel_roi_pool` (``sampling_ratio`` and ``impl`` unused).

    Args:
      features: per level [B, H_l, W_l, C], finest first (P2..P5).
      boxes: [B, R, 4] xyxy input pixels.
      output_size: out_h, out_w (or one int).
      strides: stride of each level.
      pooler: a name of :data:`ROI_POOLERS`.
      sampling_ratio: RoIAlign samples per bin along each axis.
      impl: RoIAlign implementation, a name of :func:`roi_align_impl_names`.

    Returns:
      [B, R, out_h, out_w, C] in the dtype of the features.

    Raises:
      ValueError: one line listing the valid names, if ``pooler`` is not one.
    """
    if pooler == "pool":
        return multilevel_roi_pool(features, boxes, output_size, strides)
    if pooler not in ROI_POOLERS:
        raise ValueError(f"roi_pooler must be one of {ROI_POOLERS}, got {pooler!r}")
    aligned = pooler == "align_v2"
    return multilevel_roi_align(
        features, boxes, output_size, strides, sampling_ratio, aligned, impl=impl
    )
