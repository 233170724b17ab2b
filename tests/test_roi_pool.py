"""RoIPool: golden values and torchvision parity, forward and gradient.

Exactness: the forward is a max, so it equals torchvision bit for bit. Each
gradient element is a sum of the cotangents of the bins whose argmax it is.
With small-integer cotangents those sums are exact in float32 in any order, so
the gradient must equal torchvision's exactly (this is what checks the argmax
tie-breaking). With float cotangents the two sides may add in different
orders: for n terms each sum is within (n - 1) * 2**-24 * sum|terms| of the
exact one, so they differ by at most (n - 1) * 2**-23 * sum|terms|, a bound
computed per element below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

from maskrcnn_jax.ops import assign_levels, flatten_levels
from maskrcnn_jax.ops.roi_pool import (
    _UNROLL_MAX_ROWS,
    box_bins,
    roi_pool,
    roi_pool_levels,
    round_half_away,
)
from tests.torch_ref import nhwc_to_torch, random_boxes, rois_from_batched, torch_to_nhwc


def _torch_roi_pool(f, boxes, output_size, scale, cot):
    """torchvision on NHWC / batched boxes: (output [B, R, oh, ow, C], grad NHWC)."""
    tf = nhwc_to_torch(f, requires_grad=True)
    y = torchvision.ops.roi_pool(tf, rois_from_batched(boxes), output_size, scale)
    oh, ow = output_size
    y.backward(nhwc_to_torch(cot.reshape(-1, oh, ow, f.shape[-1])))
    b, r = boxes.shape[:2]
    return torch_to_nhwc(y).reshape(b, r, oh, ow, -1), torch_to_nhwc(tf.grad)


def _ours(f, boxes, output_size, scale, cot, jit=False):
    """Our output and gradient; ``jit`` traces it inside an outer jit too."""
    fn = functools.partial(roi_pool, output_size=output_size, spatial_scale=scale)
    if jit:
        fn = jax.jit(fn)
    y, vjp = jax.vjp(lambda x: fn(x, boxes), jnp.asarray(f))
    (g,) = vjp(jnp.asarray(cot))
    return np.asarray(y), np.asarray(g)


def _hard_boxes(rng, b, r, extent, scale):
    """Random boxes plus the edge cases torchvision's rounding and clipping meet."""
    boxes = random_boxes(rng, (b, r), extent, max_size=max(extent) * 0.8)
    h, w = extent

    def half(k):  # lands on k + 0.5 feature pixels
        return (k + 0.5) / scale

    boxes[0, 0] = [w * 3, h * 3, w * 3 + 20, h * 3 + 30]  # wholly outside: empty bins
    boxes[0, 1] = [10, 10, 10, 10]  # zero area
    boxes[0, 2] = [30, 20, 12, 5]  # x2 < x1, y2 < y1: malformed, becomes 1 x 1
    boxes[0, 3] = [half(1), half(0), half(4), half(2)]  # .5 corners round away from 0
    boxes[1, 0] = [-half(1), -half(0), half(2), half(3)]  # negative .5 corners
    boxes[1, 1] = [0, 0, 0, 0]  # padding
    boxes[1, 2] = [-w, -h, 2 * w, 2 * h]  # larger than the map
    boxes[1, 3] = [w - 1, 0, w + 40, h - 1]  # mostly beyond the right edge
    return boxes


@pytest.mark.parametrize(
    "x, expected",
    [
        (0.5, 1.0),
        (-0.5, -1.0),
        (1.5, 2.0),
        (2.5, 3.0),  # jnp.round gives 2
        (-2.5, -3.0),
        (0.49999997, 0.0),  # floor(x + 0.5) gives 1: x + 0.5 rounds to 1.0
        (1.4999999, 1.0),
        (-0.0, 0.0),
        (7.0, 7.0),
    ],
)
def test_round_half_away(x, expected):
    assert float(round_half_away(jnp.float32(x))) == expected


def test_golden_bins_and_values():
    # 5 x 5 map with value 5 y + x. Box [1, 1, 3, 3]: rows and columns 1..3
    # (end inclusive), 3 pixels in 2 bins of 1.5: [floor(0), ceil(1.5)) = 1..2
    # and [floor(1.5), ceil(3)) = 2..3 (offset 1), overlapping on pixel 2.
    hs, he, ws, we = box_bins(jnp.array([1.0, 1.0, 3.0, 3.0]), 1.0, (2, 2), 5, 5)
    np.testing.assert_array_equal(np.stack([hs, he, ws, we]), [[1, 2], [3, 4], [1, 2], [3, 4]])
    f = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    out = roi_pool(f, jnp.array([[[1.0, 1.0, 3.0, 3.0]]]), 2)
    # max of rows 1..2 x cols 1..2 = 5 * 2 + 2, etc.
    np.testing.assert_array_equal(out[0, 0, :, :, 0], [[12.0, 13.0], [17.0, 18.0]])


def test_golden_division_is_correctly_rounded_under_jit():
    # roi_h = 3 rows in 7 bins: the last bin ends at ceil(7 * (3 / 7)) = 3 when
    # 3 / 7 is correctly rounded, but at 4 with XLA's x * (1 / 7) rewrite.
    boxes = jnp.array([[[0.0, 2.0, 0.0, 4.0]]])  # rows 2..4
    for fn in (box_bins, jax.jit(box_bins, static_argnums=(1, 2, 3, 4))):
        hs, he, _, _ = fn(boxes, 1.0, (7, 1), 10, 10)
        np.testing.assert_array_equal(hs[0, 0], [2, 2, 2, 3, 3, 4, 4])
        np.testing.assert_array_equal(he[0, 0], [3, 3, 4, 4, 5, 5, 5])


@pytest.mark.parametrize(
    "output_size, scale, jit",
    [((7, 7), 0.25, True), ((7, 5), 0.25, False), ((2, 3), 1.0, False), ((1, 1), 1 / 16, False)],
)
def test_matches_torchvision_with_ties(output_size, scale, jit):
    # Values in {0, 1, 2}: most bins hold several maxima, so the gradient is
    # only right if it goes to the first in row-major order, as torchvision's.
    rng = np.random.default_rng(100 * output_size[0] + output_size[1] + int(1 / scale))
    extent = (48, 64) if scale == 0.25 else ((12, 16) if scale == 1.0 else (192, 256))
    f = rng.integers(0, 3, size=(2, 12, 16, 3)).astype(np.float32)
    boxes = _hard_boxes(rng, 2, 12, extent, scale)
    cot = rng.integers(-4, 5, size=(2, 12, *output_size, 3)).astype(np.float32)
    ref_y, ref_g = _torch_roi_pool(f, boxes, output_size, scale, cot)
    y, g = _ours(f, boxes, output_size, scale, cot, jit)
    assert y.shape == (2, 12, *output_size, 3)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(g, ref_g)


@pytest.mark.parametrize("output_size", [(7, 5), (14, 14)])
def test_matches_torchvision_float_cotangents(output_size):
    rng = np.random.default_rng(sum(output_size))
    scale = 0.25
    f = rng.normal(size=(2, 12, 16, 4)).astype(np.float32)
    boxes = _hard_boxes(rng, 2, 10, (48, 64), scale)
    cot = rng.normal(size=(2, 10, *output_size, 4)).astype(np.float32)
    ref_y, ref_g = _torch_roi_pool(f, boxes, output_size, scale, cot)
    y, g = _ours(f, boxes, output_size, scale, cot)
    np.testing.assert_array_equal(y, ref_y)
    # Per element: n terms and their sum of magnitudes, from our own backward.
    _, count = _ours(f, boxes, output_size, scale, np.ones_like(cot))
    _, mag = _ours(f, boxes, output_size, scale, np.abs(cot))
    bound = np.maximum(count - 1, 0) * 2.0**-23 * mag
    assert np.all(np.abs(g - ref_g) <= bound), np.max(np.abs(g - ref_g) - bound)
    assert count.max() > 1  # some pixels do collect several bins


def test_tall_map_uses_the_scan_path_and_matches():
    # More rows than the unrolled loop takes: the lax.scan path of stage 2.
    rng = np.random.default_rng(3)
    h = _UNROLL_MAX_ROWS + 6
    f = rng.integers(0, 3, size=(1, h, 9, 2)).astype(np.float32)
    boxes = random_boxes(rng, (1, 6), (h, 9), max_size=h)
    boxes[0, 0] = [-2, -5, 10, h + 5]
    cot = rng.integers(-3, 4, size=(1, 6, 5, 3, 2)).astype(np.float32)
    ref_y, ref_g = _torch_roi_pool(f, boxes, (5, 3), 1.0, cot)
    y, g = _ours(f, boxes, (5, 3), 1.0, cot)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(g, ref_g)


def test_nan_inf_and_lowest_follow_torchvision():
    # torchvision starts each bin at -FLT_MAX with a strict `>`: NaN, -inf and
    # -FLT_MAX never win; a bin with nothing else gives -FLT_MAX, no gradient.
    lowest = np.finfo(np.float32).min
    f = np.array([[np.nan, -np.inf, 1.0], [lowest, -np.inf, 2.0]], np.float32)[None, :, :, None]
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 2, 1]]], np.float32)
    cot = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 4, 1, 1, 1)
    ref_y, ref_g = _torch_roi_pool(f, boxes, (1, 1), 1.0, cot)
    y, g = _ours(f, boxes, (1, 1), 1.0, cot)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(y.ravel(), [lowest, lowest, lowest, 2.0])
    np.testing.assert_array_equal(g, ref_g)


def test_padded_boxes_masked_by_valid_get_no_gradient():
    rng = np.random.default_rng(4)
    f = rng.integers(0, 4, size=(2, 10, 10, 2)).astype(np.float32)
    boxes = random_boxes(rng, (2, 6), (40, 40), min_size=4.0)
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0]], bool)
    boxes[~valid] = [[0, 0, 0, 0], [5, 5, 1e6, 1e6], [-1e9, 3, 7, 1e9]] * 2  # any padding
    cot = rng.integers(-3, 4, size=(2, 6, 7, 7, 2)).astype(np.float32)

    def loss(x):
        y = jax.jit(roi_pool, static_argnums=(2, 3))(x, boxes, 7, 0.25)
        return jnp.sum(jnp.where(valid[:, :, None, None, None], y * cot, 0.0))

    g = jax.grad(loss)(jnp.asarray(f))
    # torchvision on the valid boxes only (rois carry their image index).
    tf = nhwc_to_torch(f, requires_grad=True)
    rois = rois_from_batched(boxes)[torch.from_numpy(valid.reshape(-1))]
    y = torchvision.ops.roi_pool(tf, rois, (7, 7), 0.25)
    y.backward(nhwc_to_torch(cot[valid]))
    np.testing.assert_array_equal(g, torch_to_nhwc(tf.grad))


def test_boxes_get_zero_gradient():
    f = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
    boxes = jnp.array([[[1.0, 1.0, 5.0, 6.0]]])
    g = jax.grad(lambda b: roi_pool(f, b, 2).sum())(boxes)
    np.testing.assert_array_equal(g, np.zeros((1, 1, 4)))


def test_bfloat16_forward_and_integer_gradient():
    rng = np.random.default_rng(5)
    f = rng.integers(-8, 8, size=(1, 12, 16, 3)).astype(np.float32)  # exact in bf16
    boxes = _hard_boxes(rng, 2, 6, (48, 64), 0.25)[:1]
    cot = rng.integers(-4, 5, size=(1, 6, 7, 7, 3)).astype(np.float32)
    ref_y, ref_g = _torch_roi_pool(f, boxes, (7, 7), 0.25, cot)
    y, vjp = jax.vjp(lambda x: roi_pool(x, boxes, 7, 0.25), jnp.asarray(f, jnp.bfloat16))
    (g,) = vjp(jnp.asarray(cot, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), ref_y)
    # Integer sums are exact in the float32 accumulator and rounded once to
    # bfloat16 (8 significant bits), so the gradient is torchvision's, rounded.
    expected = np.asarray(jnp.asarray(ref_g, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(g, np.float32), expected)


@pytest.mark.parametrize("output_size", [(7, 7), (14, 14)])
def test_multilevel_matches_per_level_torchvision(output_size):
    # FPN P2..P5 of a 128 x 96 image; boxes of all sizes so that every level
    # is used, assigned by torchvision's LevelMapper (which assign_levels
    # must reproduce).
    rng = np.random.default_rng(6)
    strides = (4, 8, 16, 32)
    feats = [rng.integers(0, 3, size=(2, 128 // s, 96 // s, 3)).astype(np.float32) for s in strides]
    boxes = random_boxes(rng, (2, 40), (128, 96), min_size=2.0, max_size=120.0)
    # sqrt(area) 8, 60, 120, 300, 520: P2 (clamped), P2, P3, P4, P5 (clamped).
    boxes[0, :5] = [
        [0, 0, 8, 8],
        [0, 0, 60, 60],
        [10, 10, 130, 130],
        [0, 0, 300, 300],
        [-20, -20, 500, 500],
    ]
    mapper = LevelMapper(2, 5)
    tv_levels = mapper([torch.from_numpy(b) for b in boxes]).numpy().reshape(2, 40)
    levels = np.asarray(assign_levels(jnp.asarray(boxes)))
    np.testing.assert_array_equal(levels, tv_levels)
    assert set(levels.ravel()) == {0, 1, 2, 3}

    flat, shapes = flatten_levels([jnp.asarray(x) for x in feats])
    scales = [1.0 / s for s in strides]
    cot = rng.integers(-3, 4, size=(2, 40, *output_size, 3)).astype(np.float32)
    fn = jax.jit(roi_pool_levels, static_argnums=(3, 4, 5))
    y, vjp = jax.vjp(
        lambda x: fn(x, boxes, levels, tuple(shapes), tuple(scales), output_size), flat
    )
    (g,) = vjp(jnp.asarray(cot))

    ref_y = np.zeros_like(np.asarray(y))
    ref_grads = []
    for lvl, (x, scale) in enumerate(zip(feats, scales)):
        mine = levels == lvl
        tf = nhwc_to_torch(x, requires_grad=True)
        rois = rois_from_batched(boxes)[torch.from_numpy(mine.reshape(-1))]
        out = torchvision.ops.roi_pool(tf, rois, output_size, scale)
        out.backward(nhwc_to_torch(cot[mine]))
        ref_y[mine] = torch_to_nhwc(out)
        ref_grads.append(torch_to_nhwc(tf.grad).reshape(2, -1, 3))
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(g, np.concatenate(ref_grads, axis=1))


def test_multilevel_ignores_sampling_ratio_and_aligned_and_unknown_levels():
    rng = np.random.default_rng(7)
    flat = jnp.asarray(rng.normal(size=(1, 16 * 16 + 8 * 8, 2)).astype(np.float32))
    boxes = jnp.asarray(random_boxes(rng, (1, 5), (64, 64), min_size=4.0))
    levels = jnp.array([[0, 1, 1, 2, -1]])  # 2 and -1 name no level
    args = (flat, boxes, levels, [(16, 16), (8, 8)], [0.25, 0.125], (3, 4))
    base = roi_pool_levels(*args)
    np.testing.assert_array_equal(roi_pool_levels(*args, sampling_ratio=0, aligned=True), base)
    np.testing.assert_array_equal(base[0, 3:], 0.0)
    g = jax.grad(lambda x: roi_pool_levels(x, *args[1:])[0, 3:].sum())(flat)
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: roi_pool(jnp.zeros((1, 4, 4)), jnp.zeros((1, 1, 4)), 2), "features must be"),
        (lambda: roi_pool(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 5)), 2), "boxes must be"),
        (lambda: roi_pool(jnp.zeros((2, 4, 4, 1)), jnp.zeros((1, 1, 4)), 2), "boxes must be"),
        (lambda: roi_pool(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 0), "output_size"),
        (
            lambda: roi_pool_levels(
                jnp.zeros((1, 20, 1)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2)), [(4, 4)], [1.0], 2
            ),
            "level_shapes cover 16",
        ),
        (
            lambda: roi_pool_levels(
                jnp.zeros((1, 16, 1)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 3)), [(4, 4)], [1.0], 2
            ),
            "levels must be",
        ),
        (
            lambda: roi_pool_levels(
                jnp.zeros((1, 16, 1)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2)), [(4, 4)], [], 2
            ),
            "spatial scales",
        ),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
