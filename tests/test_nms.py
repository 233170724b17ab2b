"""Static-shape NMS (tiled and loop) against torchvision.ops.nms / batched_nms.

Every comparison is exact: the kept indices, in order, must equal
torchvision's. The IoU arithmetic is the same float32 arithmetic as
torchvision's CPU kernel, so there is no tolerance to choose.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import ops
from tests.torch_ref import random_boxes

METHODS = ["tiled", "loop"]


def _kept(indices, valid):
    return np.asarray(indices)[np.asarray(valid)]


def _torch_nms(boxes, scores, thr, valid=None):
    """torchvision.ops.nms on the valid boxes, as indices into all boxes."""
    idx = np.arange(len(boxes)) if valid is None else np.flatnonzero(valid)
    keep = torchvision.ops.nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), thr)
    return idx[keep.numpy()]


def _per_label_torch_nms(boxes, scores, labels, thr):
    """torchvision.ops.nms per label, merged by descending score, ties by index.

    This is batched_nms's per-label path with a stable merge; torchvision's own
    merge sort is not stable, so with score ties across labels its order is
    not defined.
    """
    kept = np.concatenate([_torch_nms(boxes, scores, thr, labels == c) for c in np.unique(labels)])
    return kept[np.lexsort((kept, -scores[kept]))]


def _nms_fn(method, thr, max_outputs, jit=True, **kw):
    f = functools.partial(ops.nms, iou_threshold=thr, max_outputs=max_outputs, method=method, **kw)
    return jax.jit(f) if jit else f


def _crowded_boxes(rng, n):
    """[n, 4] boxes with many exact duplicates and near duplicates, scores with many ties.

    A quarter of the boxes are exact copies of others, a quarter are copies
    shifted by a few float32 ulps or a pixel; scores take 20 distinct values.
    """
    base = random_boxes(rng, (n // 2,), (300, 300), min_size=8, max_size=80)
    copies = base[rng.integers(0, len(base), n // 4)]
    near = base[rng.integers(0, len(base), n - len(base) - len(copies))]
    shift = rng.choice([-1.0, -1e-4, 1e-4, 1.0], size=near.shape).astype(np.float32)
    boxes = np.concatenate([base, copies, near + shift]).astype(np.float32)
    boxes = boxes[rng.permutation(n)]
    scores = (rng.integers(0, 20, size=n) / 20).astype(np.float32)
    return boxes, scores


def _pairs_at_threshold(rng, n, h):
    """n boxes in pairs whose IoU is exactly float32(h / 10), and random scores with ties.

    Pair k is ``[x, y, x+10, y+10]`` and ``[x, y, x+10, y+h]`` at integer x, y:
    the intersection (10h) and union (100) are exact, so the IoU is the
    correctly rounded 10h / 100. Pairs sit 20 px apart and do not touch.
    """
    k = np.arange(n // 2)
    x, y = (k % 50) * 20.0, (k // 50) * 20.0
    big = np.stack([x, y, x + 10, y + 10], axis=-1)
    small = np.stack([x, y, x + 10, y + h], axis=-1)
    boxes = np.stack([big, small], axis=1).reshape(-1, 4).astype(np.float32)
    scores = (rng.integers(0, 5, size=len(boxes)) / 5).astype(np.float32)
    return boxes, scores


# The loop method is also run without jit by the tests below (small cases).
@pytest.mark.parametrize("method, jit", [("tiled", True), ("tiled", False), ("loop", True)])
@pytest.mark.parametrize("seed, thr", [(0, 0.5), (1, 0.7), (2, 0.3)])
def test_matches_torchvision(seed, thr, method, jit):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, (300,), (200, 200), min_size=5, max_size=60)
    scores = rng.uniform(size=300).astype(np.float32)
    scores[::7] = scores[0]  # ties, resolved by index as torchvision does
    ref = _torch_nms(boxes, scores, thr)
    idx, valid = _nms_fn(method, thr, 300, jit)(boxes, scores)
    assert idx.shape == valid.shape == (300,)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(_kept(idx, valid), ref)
    # Truncation keeps the first max_outputs in the same order.
    idx, valid = _nms_fn(method, thr, 10, jit)(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, valid), ref[:10])


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_batched_matches_torchvision(method, jit):
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, (200,), (100, 100), min_size=5, max_size=50)
    scores = rng.uniform(size=200).astype(np.float32)
    labels = rng.integers(0, 5, size=200).astype(np.int32)
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5
    ).numpy()
    f = functools.partial(ops.batched_nms, iou_threshold=0.5, max_outputs=250, method=method)
    idx, valid = (jax.jit(f) if jit else f)(boxes, scores, labels)
    assert idx.shape == (250,)
    np.testing.assert_array_equal(_kept(idx, valid), ref)


@pytest.mark.parametrize("method", METHODS)
def test_invalid_entries_never_kept_or_suppress(method):
    boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]], jnp.float32)
    scores = jnp.array([0.9, 0.8, 0.7])
    valid = jnp.array([False, True, True])
    idx, ok = ops.nms(boxes, scores, 0.5, 3, valid, method=method)
    np.testing.assert_array_equal(_kept(idx, ok), [1])


@pytest.mark.parametrize("method", METHODS)
def test_all_invalid_and_empty(method):
    idx, ok = ops.nms(jnp.zeros((4, 4)), jnp.ones(4), 0.5, 6, jnp.zeros(4, bool), method=method)
    assert idx.shape == (6,)
    assert not bool(ok.any())
    idx, ok = ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3, method=method)
    assert ok.shape == (3,)
    assert not bool(ok.any())


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_boxes(method):
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 4, 4]], np.float32)
    scores = np.array([0.5, 0.4, 0.3], np.float32)
    idx, ok = ops.nms(boxes, scores, 0.5, 3, method=method)
    np.testing.assert_array_equal(_kept(idx, ok), _torch_nms(boxes, scores, 0.5))


# (threshold, h, kept): boxes [0,0,10,10] and [0,0,10,h] have IoU float32(h/10).
# torchvision suppresses at float32 IoU > float64 threshold: float32(0.5) == 0.5
# and float32(0.7) < 0.7 are not above their thresholds, float32(0.3) > 0.3 is.
AT_THRESHOLD = [
    (0.5, 5, [0, 1]),
    (0.7, 7, [0, 1]),
    (0.3, 3, [0]),
    (float(np.float32(0.3)), 3, [0, 1]),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("thr, h, kept", AT_THRESHOLD)
def test_iou_equal_to_threshold_is_not_suppressed(thr, h, kept, method):
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, h]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert ops.box_iou(boxes[:1], boxes[1:])[0, 0] == np.float32(h / 10)
    np.testing.assert_array_equal(_torch_nms(boxes, scores, thr), kept)
    idx, ok = _nms_fn(method, thr, 2)(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, ok), kept)


@pytest.mark.parametrize("thr, h, kept", AT_THRESHOLD[::2])
def test_many_pairs_at_threshold(thr, h, kept):
    rng = np.random.default_rng(h)
    boxes, scores = _pairs_at_threshold(rng, 2000, h)
    ref = _torch_nms(boxes, scores, thr)
    assert len(ref) == (2000 if len(kept) == 2 else 1000)
    idx, ok = _nms_fn("tiled", thr, 2000, tile_size=128)(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, ok), ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_large_crowded_with_ties(thr, method):
    rng = np.random.default_rng(11)
    boxes, scores = _crowded_boxes(rng, 5000)
    ref = _torch_nms(boxes, scores, thr)
    idx, ok = _nms_fn(method, thr, 5000)(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, ok), ref)


def test_large_padded_and_truncated():
    rng = np.random.default_rng(12)
    boxes, scores = _crowded_boxes(rng, 5000)
    valid = rng.uniform(size=5000) < 0.6
    ref = _torch_nms(boxes, scores, 0.6, valid)
    for max_outputs in (5200, len(ref), 100):
        idx, ok = _nms_fn("tiled", 0.6, max_outputs)(boxes, scores, valid=valid)
        assert ok.shape == (max_outputs,)
        np.testing.assert_array_equal(_kept(idx, ok), ref[:max_outputs])
        np.testing.assert_array_equal(np.asarray(idx)[~np.asarray(ok)], 0)


def test_large_batched_with_classes():
    rng = np.random.default_rng(13)
    boxes, scores = _crowded_boxes(rng, 5000)
    labels = rng.integers(0, 8, size=5000).astype(np.int32)
    valid = rng.uniform(size=5000) < 0.9
    ref = _per_label_torch_nms(boxes[valid], scores[valid], labels[valid], 0.5)
    ref = np.flatnonzero(valid)[ref]
    f = functools.partial(ops.batched_nms, iou_threshold=0.5, max_outputs=5000)
    idx, ok = jax.jit(f)(boxes, scores, labels, valid=valid)
    np.testing.assert_array_equal(_kept(idx, ok), ref)


def test_vmapped_over_batch():
    rng = np.random.default_rng(14)
    batch, n = 4, 1000
    data = [_crowded_boxes(rng, n) for _ in range(batch)]
    boxes = np.stack([d[0] for d in data])
    scores = np.stack([d[1] for d in data])
    # Images with very different numbers of valid boxes (and tiles to settle).
    valid = rng.uniform(size=(batch, n)) < np.array([1.0, 0.5, 0.05, 0.0])[:, None]
    f = functools.partial(ops.nms, iou_threshold=0.7, max_outputs=n, tile_size=128)
    idx, ok = jax.jit(jax.vmap(f))(boxes, scores, valid=valid)
    assert idx.shape == ok.shape == (batch, n)
    for i in range(batch):
        ref = _torch_nms(boxes[i], scores[i], 0.7, valid[i])
        np.testing.assert_array_equal(_kept(idx[i], ok[i]), ref)


@pytest.mark.parametrize("method", METHODS)
def test_long_suppression_chain(method):
    """Box i overlaps only i-1 and i+1: greedy keeps every other box.

    Settling a tile then takes as many fixed-point rounds as the tile is long.
    """
    x = np.arange(300, dtype=np.float32) * 3
    boxes = np.stack([x, np.zeros_like(x), x + 10, np.full_like(x, 10)], axis=-1)
    scores = np.linspace(1, 0.1, 300, dtype=np.float32)
    ref = _torch_nms(boxes, scores, 0.3)
    np.testing.assert_array_equal(ref, np.arange(0, 300, 2))
    idx, ok = _nms_fn(method, 0.3, 300)(boxes, scores)
    np.testing.assert_array_equal(_kept(idx, ok), ref)


@pytest.mark.parametrize(
    "seed, n, tile_size, thr, max_outputs, labelled",
    [
        (0, 1, 1, 0.5, 3, False),
        (1, 2, 1, 0.0, 2, True),
        (2, 50, 3, 0.5, 50, False),
        (3, 300, 17, 0.7, 300, True),
        (4, 300, 64, 1.0, 300, False),
        (5, 700, 256, 0.4, 40, True),
        (6, 700, 1000, 0.6, 700, False),
        (7, 1000, 128, 0.5, 1000, True),
    ],
)
def test_tiled_equals_loop(seed, n, tile_size, thr, max_outputs, labelled):
    rng = np.random.default_rng(seed)
    boxes, scores = _crowded_boxes(rng, max(n, 4))
    boxes, scores = boxes[:n], scores[:n]
    valid = rng.uniform(size=n) < 0.8
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    outs = []
    for method in METHODS:
        kw = {"iou_threshold": thr, "max_outputs": max_outputs}
        kw.update(method=method, tile_size=tile_size)
        if labelled:
            f = functools.partial(ops.batched_nms, labels=labels, **kw)
        else:
            f = functools.partial(ops.nms, **kw)
        outs.append(jax.jit(f)(boxes, scores, valid=valid))
    (idx_t, ok_t), (idx_l, ok_l) = outs
    np.testing.assert_array_equal(ok_t, ok_l)
    np.testing.assert_array_equal(idx_t, idx_l)


def test_bad_arguments():
    boxes, scores = jnp.zeros((3, 4)), jnp.zeros(3)
    with pytest.raises(ValueError, match="method"):
        ops.nms(boxes, scores, 0.5, 3, method="greedy")
    with pytest.raises(ValueError, match="tile_size"):
        ops.nms(boxes, scores, 0.5, 3, tile_size=0)
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        ops.nms(jnp.zeros((3, 5)), scores, 0.5, 3)
    with pytest.raises(ValueError, match="scores"):
        ops.nms(boxes, jnp.zeros(4), 0.5, 3)
