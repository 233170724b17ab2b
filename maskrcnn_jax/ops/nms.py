"""Static-shape greedy non-maximum suppression.

Same kept boxes in the same order as ``torchvision.ops.nms`` /
``batched_nms``: candidates are visited by descending score (ties broken by the
lower index, a stable sort as torchvision's CPU kernel does), and a candidate
is dropped when its IoU with an already kept box is strictly greater than the
threshold. The output is padded to ``max_outputs`` with a ``valid`` mask.

Two implementations give the same kept set:

- ``"tiled"``: the sorted boxes are settled in tiles of ``tile_size``. A tile is
  first suppressed by the boxes kept in earlier tiles (``[tile, tile]`` IoU
  blocks against those boxes, packed), then suppression inside the tile is
  settled by a fixed-point iteration on its own ``[tile, tile]`` IoU block.
  About ``N / tile_size`` sequential steps, each a few vectorised ones.
- ``"loop"``: the textbook greedy loop, ``N`` sequential steps over one
  precomputed ``[N, N]`` IoU matrix. Kept as the reference.

Why the tile's fixed point is the greedy answer: with the tile's boxes in score
order, greedy NMS is the recurrence ``keep[j] = alive[j] & ~any_{i<j}(keep[i] &
over[i, j])``, where ``alive`` says the box is a candidate not suppressed by an
earlier tile. Its right-hand side for ``j`` reads only entries ``< j``, so the
recurrence has exactly one solution (forward substitution) and the iteration
``k <- F(k)`` reaches it: after ``m`` rounds the first ``m`` entries are final
whatever the start, so it stops, unchanged, after at most ``tile + 1`` rounds,
and a state that ``F`` leaves unchanged solves the recurrence. Typical tiles
settle in a handful of rounds.

The IoU is :func:`maskrcnn_jax.ops.boxes.box_iou` with the earlier (higher
score) box as ``boxes1``, the operand order of torchvision's CPU kernel, so the
float32 arithmetic is the same. torchvision compares that float32 IoU with the
threshold as a float64 (``ovr > iou_threshold``); :func:`_float32_threshold`
turns a Python threshold into the float32 that gives the same comparison (for
0.3, float32(0.3) is above 0.3, and an IoU equal to it is suppressed).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops.boxes import box_iou

Method = Literal["tiled", "loop"]
METHODS = ("tiled", "loop")
DEFAULT_METHOD: Method = "tiled"
# On a 2-core CPU, 128 was the steadiest (experiments/bench_nms.py): at 256 the
# vmapped [B, T, T] blocks fall out of cache. Accelerators may prefer larger.
DEFAULT_TILE_SIZE = 128


def _float32_threshold(iou_threshold: float | jnp.ndarray) -> np.float32 | jnp.ndarray:
    """The float32 ``t`` with ``iou > t`` iff ``float64(iou) > iou_threshold``.

    For a float32 ``iou`` and a Python threshold ``x``: ``iou > x`` holds iff
    ``iou > t`` where ``t`` is the largest float32 not above ``x`` (the next
    float32 after ``t`` is already above ``x``). Rounding ``x`` to nearest can
    round up and would then keep an IoU equal to ``float32(x)`` that
    torchvision suppresses. An array threshold is taken as float32 as it is.
    """
    if isinstance(iou_threshold, (int, float, np.integer, np.floating)):
        x = float(iou_threshold)
        with np.errstate(over="ignore"):
            t = np.float32(x)
        if float(t) > x:
            t = np.nextafter(t, np.float32(-np.inf))
        return t
    return jnp.asarray(iou_threshold, jnp.float32)


def _overlaps(
    boxes1: jnp.ndarray,
    labels1: jnp.ndarray | None,
    boxes2: jnp.ndarray,
    labels2: jnp.ndarray | None,
    threshold: np.float32 | jnp.ndarray,
) -> jnp.ndarray:
    """[R, C] bool: would a kept ``boxes1[r]`` suppress ``boxes2[c]``.

    ``boxes1`` are the higher-scored (earlier) boxes. With labels, only boxes of
    the same label suppress each other.
    """
    over = box_iou(boxes1, boxes2) > threshold
    if labels1 is not None:
        over = over & (labels1[:, None] == labels2[None, :])
    return over


def _any_over_rows(mask: jnp.ndarray) -> jnp.ndarray:
    """[R, C] bool -> [C] bool, ``jnp.any(mask, axis=0)``.

    As a float32 max: XLA:CPU vectorises that reduction but not the boolean
    one, which measured 2-5x slower here (experiments/bench_nms.py).
    """
    return jnp.max(jnp.where(mask, 1.0, 0.0), axis=0) > 0


def _loop_keep(boxes, labels, candidate, threshold):
    """Greedy NMS as N sequential steps over the [N, N] overlap matrix.

    Args:
      boxes: [N, 4] float32, sorted by descending score.
      labels: [N] int or None, in the same order.
      candidate: [N] bool, which sorted boxes may be kept at all.
      threshold: from :func:`_float32_threshold`.

    Returns:
      [N] bool, kept boxes.
    """
    n = boxes.shape[0]
    overlaps = _overlaps(boxes, labels, boxes, labels, threshold)  # [N, N]
    later = jnp.arange(n)

    def body(i, state):
        keep, suppressed = state
        keep_i = candidate[i] & ~suppressed[i]
        keep = keep.at[i].set(keep_i)
        suppressed = suppressed | (keep_i & overlaps[i] & (later > i))
        return keep, suppressed

    init = (jnp.zeros((n,), bool), jnp.zeros((n,), bool))
    keep, _ = jax.lax.fori_loop(0, n, body, init)
    return keep


def _tiled_keep(boxes, labels, candidate, threshold, tile_size, max_outputs):
    """Greedy NMS settled tile by tile; same arguments and result as :func:`_loop_keep`.

    The boxes kept so far are also packed, in score order, at the front of a
    buffer, so a tile is tested against ``ceil(kept / T)`` [T, T] blocks of kept
    boxes rather than against all earlier boxes. Stops early once
    ``max_outputs`` boxes are kept (later ones would be cut off anyway) or no
    candidate is left.
    """
    n = boxes.shape[0]
    t = min(tile_size, n)
    num_tiles = -(-n // t)
    padded = num_tiles * t
    boxes = jnp.pad(boxes, ((0, padded - n), (0, 0)))  # [Np, 4]
    candidate = jnp.pad(candidate, (0, padded - n))
    has_labels = labels is not None
    labels = jnp.pad(labels, (0, padded - n)) if has_labels else jnp.zeros((padded,), jnp.int32)
    # One past the last candidate; tiles from there on keep nothing.
    end = jnp.max(jnp.where(candidate, jnp.arange(padded) + 1, 0))
    earlier = jnp.arange(t)[:, None] < jnp.arange(t)[None, :]  # [T, T], i < j

    def overlaps(boxes1, labels1, boxes2, labels2):
        if not has_labels:
            labels1 = labels2 = None
        return _overlaps(boxes1, labels1, boxes2, labels2, threshold)

    def settle_tile(state):
        tile, keep, count, kept_boxes, kept_labels = state
        start = tile * t
        tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, t)  # [T, 4]
        tile_labels = jax.lax.dynamic_slice_in_dim(labels, start, t)

        # Suppressed by a box kept in an earlier tile: those are the first
        # `count` rows of kept_boxes, visited T at a time.
        def suppress_by_chunk(c, suppressed):
            rows = jax.lax.dynamic_slice_in_dim(kept_boxes, c * t, t)  # [T, 4]
            row_labels = jax.lax.dynamic_slice_in_dim(kept_labels, c * t, t)
            is_kept = c * t + jnp.arange(t) < count
            over = overlaps(rows, row_labels, tile_boxes, tile_labels)  # [T, T]
            return suppressed | _any_over_rows(is_kept[:, None] & over)

        num_chunks = (count + t - 1) // t
        by_earlier = jax.lax.fori_loop(0, num_chunks, suppress_by_chunk, jnp.zeros((t,), bool))
        alive = jax.lax.dynamic_slice_in_dim(candidate, start, t) & ~by_earlier
        inner = overlaps(tile_boxes, tile_labels, tile_boxes, tile_labels) & earlier  # [T, T]

        def step(k):  # [T] -> [T], the greedy recurrence applied once
            return alive & ~_any_over_rows(k[:, None] & inner)

        def changed(s):
            return jnp.any(s[0] != s[1])

        kept, _ = jax.lax.while_loop(changed, lambda s: (step(s[0]), s[0]), (step(alive), alive))
        keep = jax.lax.dynamic_update_slice_in_dim(keep, kept, start, axis=0)
        # Append this tile's kept boxes after the `count` earlier ones (the rest
        # of the T rows written is overwritten later or never read). count <=
        # start, so the T rows fit without the slice being clamped.
        packed = jnp.argsort(~kept, stable=True)  # [T], kept first, in order
        kept_boxes = jax.lax.dynamic_update_slice_in_dim(kept_boxes, tile_boxes[packed], count, 0)
        kept_labels = jax.lax.dynamic_update_slice_in_dim(
            kept_labels, tile_labels[packed], count, 0
        )
        count = count + jnp.sum(kept, dtype=jnp.int32)
        return tile + 1, keep, count, kept_boxes, kept_labels

    def more(state):
        tile, _, count, _, _ = state
        return (tile < num_tiles) & (tile * t < end) & (count < max_outputs)

    init = (
        jnp.int32(0),
        jnp.zeros((padded,), bool),  # keep, in sorted order
        jnp.int32(0),  # boxes kept so far
        jnp.zeros_like(boxes),  # [Np, 4] kept boxes, packed
        jnp.zeros_like(labels),  # [Np] their labels
    )
    _, keep, _, _, _ = jax.lax.while_loop(more, settle_tile, init)
    return keep[:n]


def _check_method(method: str, tile_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"nms: method must be one of {METHODS}, got {method!r}")
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise ValueError(f"nms: tile_size must be a positive int, got {tile_size!r}")


def _nms(boxes, scores, valid, labels, iou_threshold, max_outputs, method, tile_size):
    _check_method(method, tile_size)
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((max_outputs,), jnp.int32), jnp.zeros((max_outputs,), bool)
    if valid is None:
        valid = jnp.ones((n,), bool)
    valid = valid & ~jnp.isnan(scores)
    # Invalid entries sort last; stable sort keeps torchvision's tie order.
    key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, stable=True)
    sorted_boxes = boxes[order].astype(jnp.float32)
    sorted_labels = None if labels is None else jnp.asarray(labels)[order]
    threshold = _float32_threshold(iou_threshold)
    if method == "loop":
        keep = _loop_keep(sorted_boxes, sorted_labels, valid[order], threshold)
    else:
        keep = _tiled_keep(
            sorted_boxes, sorted_labels, valid[order], threshold, int(tile_size), max_outputs
        )
    if max_outputs > n:  # pad so that there are at least max_outputs slots
        keep = jnp.concatenate([keep, jnp.zeros((max_outputs - n,), bool)])
        order = jnp.concatenate([order, jnp.zeros((max_outputs - n,), order.dtype)])
    # Kept positions first, in score order; then padding.
    first = jnp.argsort(~keep, stable=True)[:max_outputs]
    out_valid = keep[first]
    indices = jnp.where(out_valid, order[first], 0).astype(jnp.int32)
    return indices, out_valid


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float,
    max_outputs: int,
    valid: jnp.ndarray | None = None,
    *,
    method: Method = DEFAULT_METHOD,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS with a static output size, equal to ``torchvision.ops.nms``.

    Args:
      boxes: [N, 4] xyxy.
      scores: [N]. NaN scores count as invalid.
      iou_threshold: boxes overlapping a kept box with IoU > this are dropped
        (compared as torchvision's CPU kernel does: float32 IoU vs a float64
        threshold).
      max_outputs: static number of output slots.
      valid: optional [N] bool; invalid boxes are never kept and never
        suppress others.
      method: ``"tiled"`` (about N / tile_size sequential steps) or ``"loop"``
        (N steps); both give the same result.
      tile_size: boxes per tile of the tiled method (capped at N).

    Returns:
      indices: [max_outputs] int32 indices into ``boxes`` of the kept boxes,
        by descending score; padded slots hold 0.
      valid: [max_outputs] bool, which slots hold a kept box.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [{boxes.shape[0]}], got {tuple(scores.shape)}")
    return _nms(boxes, scores, valid, None, iou_threshold, max_outputs, method, tile_size)


def batched_nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    labels: jnp.ndarray,
    iou_threshold: float,
    max_outputs: int,
    valid: jnp.ndarray | None = None,
    *,
    method: Method = DEFAULT_METHOD,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Class-aware NMS: boxes only suppress boxes of the same label.

    The kept set of greedy NMS run per label on the original coordinates, which
    is ``torchvision.ops.batched_nms`` (its per-label path; for more than 1000
    boxes on CPU torchvision offsets the coordinates per label instead, which
    can round an IoU differently). Arguments and outputs as :func:`nms`, plus
    ``labels: [N]`` int class (or level) ids.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores and labels must be [{boxes.shape[0]}], got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    return _nms(boxes, scores, valid, labels, iou_threshold, max_outputs, method, tile_size)
