"""Anchor generation for all FPN levels, in torchvision's order."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# The strides of the FPN levels P2..P6 of Mask R-CNN (torchvision's ResNet-FPN):
# the one definition, passed down by the model to the anchors and the RoI heads.
FPN_STRIDES = (4, 8, 16, 32, 64)

# torchvision's Mask R-CNN defaults: one size per level (P2..P6), three ratios.
DEFAULT_STRIDES = FPN_STRIDES  # the former name, kept for existing imports
DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Anchors centred on the origin for one level.

    Args:
      sizes: anchor sizes (sqrt of the area) in pixels.
      aspect_ratios: height / width ratios.

    Returns:
      [len(aspect_ratios) * len(sizes), 4] xyxy, ratio-major, rounded to whole
      pixels (half to even) like torchvision.
    """
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def feature_grid(image_size: Sequence[int], stride: int) -> tuple[int, int]:
    """(height, width) of the feature map at ``stride`` for a padded input.

    Strided 3x3 convs with padding 1, and the 1x1 stride-2 max-pool of P6, all
    round up, so the grid is ``ceil(size / stride)``.
    """
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def generate_anchors(
    image_size: Sequence[int],
    strides: Sequence[int] = FPN_STRIDES,
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
) -> jnp.ndarray:
    """Anchors of every FPN level for one padded input size.

    The order equals ``torchvision.models.detection.anchor_utils.AnchorGenerator``:
    level by level; within a level row-major over grid cells (y, then x); within a
    cell the level's cell anchors. As in torchvision the shift between cells is
    ``image_size // grid_size``, which for a level whose grid was rounded up (P6
    of a 800-pixel side: 13 cells) is not the nominal stride (61, not 64).

    Args:
      image_size: (height, width) of the padded network input, static ints.
      strides: nominal stride of each level.
      sizes: anchor sizes per level.
      aspect_ratios: one tuple of ratios shared by all levels, or one per level.

    Returns:
      [A, 4] xyxy anchors, A = sum over levels of grid_h * grid_w * anchors per cell.
    """
    if len(strides) != len(sizes):
        raise ValueError(f"strides ({len(strides)}) and sizes ({len(sizes)}) differ in length")
    if aspect_ratios and not isinstance(aspect_ratios[0], (tuple, list)):
        aspect_ratios = (tuple(aspect_ratios),) * len(strides)
    if len(aspect_ratios) != len(strides):
        raise ValueError(f"need one aspect_ratios tuple per level, got {len(aspect_ratios)}")
    out = []
    for stride, level_sizes, ratios in zip(strides, sizes, aspect_ratios):
        gh, gw = feature_grid(image_size, stride)
        step_y, step_x = image_size[0] // gh, image_size[1] // gw
        base = cell_anchors(level_sizes, ratios)  # [a, 4]
        ys = np.arange(gh, dtype=np.int64) * step_y
        xs = np.arange(gw, dtype=np.int64) * step_x
        sy, sx = np.meshgrid(ys, xs, indexing="ij")
        shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4).astype(np.float32)
        out.append((shifts + base[None]).reshape(-1, 4))
    return jnp.asarray(np.concatenate(out, axis=0))


def num_anchors_per_level(
    image_size: Sequence[int],
    strides: Sequence[int] = FPN_STRIDES,
    anchors_per_cell: int = 3,
) -> list[int]:
    """Number of anchors of each level, in :func:`generate_anchors` order."""
    return [int(np.prod(feature_grid(image_size, s))) * anchors_per_cell for s in strides]
