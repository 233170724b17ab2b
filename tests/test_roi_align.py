"""RoIAlign reference op: hand-computed values, torchvision parity (forward and gradient).

Multi-level pooling, level assignment and the ``impl`` registry are tested in
``test_poolers.py``; the shared geometry in ``test_roi_geometry.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

from maskrcnn_jax import ops
from maskrcnn_jax.ops.roi_align import roi_align_levels
from tests.torch_ref import nhwc_to_torch, random_boxes, rois_from_batched, torch_to_nhwc


def _arange_map():
    return jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)  # value = 5 y + x


# Golden values: every sample point, bilinear weight (0, 1/2 or 1, times 1/4
# for the 2x2 samples) and map value (an integer < 25) is a dyadic rational of
# a few bits, so each float32 product and sum is exact, in any order; the
# rtol=1e-6 below guards nothing but the printout.
@pytest.mark.parametrize(
    "aligned, box, expected",
    [
        # aligned: box [1,1,3,3] starts at 0.5, samples at 1.0 and 2.0 -> mean (1.5, 1.5)
        (True, [1, 1, 3, 3], 5 * 1.5 + 1.5),
        # not aligned: starts at 1, samples at 1.5 and 2.5 -> mean (2, 2)
        (False, [1, 1, 3, 3], 12.0),
        # last row/column: y = 4.5 is clamped to 4 -> (21 + 21.5 + 23.5 + 24) / 4
        (False, [3, 3, 5, 5], 22.5),
        # wholly outside (samples beyond size + 1... > 5): zero
        (False, [10, 10, 12, 12], 0.0),
    ],
)
def test_one_bin(aligned, box, expected):
    out = ops.roi_align(_arange_map(), jnp.array([[box]], jnp.float32), 1, 1.0, 2, aligned)
    chex.assert_shape(out, (1, 1, 1, 1, 1))
    np.testing.assert_allclose(out[0, 0, 0, 0, 0], expected, rtol=1e-6)


def test_linear_map_is_reproduced_inside():
    # Bilinear interpolation of a linear function is exact: bin centres.
    # Samples at integer points (-0.5 + 0.5, ...), so the arithmetic is exact.
    boxes = jnp.array([[[0, 0, 4, 4]]], jnp.float32)
    out = ops.roi_align(_arange_map(), boxes, 2, 1.0, 2, True)
    # aligned: start -0.5, bins of 2 -> centres at 0.5 and 2.5
    expected = np.array([[5 * 0.5 + 0.5, 5 * 0.5 + 2.5], [5 * 2.5 + 0.5, 5 * 2.5 + 2.5]])
    np.testing.assert_allclose(out[0, 0, :, :, 0], expected, rtol=1e-6)


def test_adaptive_sampling_refused():
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.roi_align(_arange_map(), jnp.zeros((1, 1, 4)), 2, 1.0, 0)


def test_levels_contract_shapes_and_errors():
    # The contract every implementation follows, on the reference itself.
    flat, shapes = ops.flatten_levels([_arange_map(), _arange_map()[:, :2, :3]])
    # Bins of 1 x 1 pixel: dyadic sample points, so the values are exact.
    boxes = jnp.array([[[0, 0, 3, 2], [0, 0, 3, 2], [0.5, 0, 3.5, 2]]], jnp.float32)
    levels = jnp.array([[0, 1, 1]], jnp.int32)
    out = roi_align_levels(flat, boxes, levels, shapes, [1.0, 1.0], (2, 3))
    chex.assert_shape(out, (1, 3, 2, 3, 1))
    assert not np.array_equal(out[:, 0], out[:, 1])  # same box, other level
    # A box on level 1 sees only level 1: equal to pooling that map alone.
    alone = ops.roi_align(_arange_map()[:, :2, :3], boxes[:, 1:], (2, 3))
    np.testing.assert_array_equal(out[:, 1:], alone)
    with pytest.raises(ValueError, match="levels must be"):
        roi_align_levels(flat, boxes, levels[:, :1], shapes, [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="level_shapes cover"):
        roi_align_levels(flat, boxes, levels, shapes[:1], [1.0], 2)


def _torch_roi_align(f, boxes, out, scale, sr, aligned, cot):
    tf = nhwc_to_torch(f, requires_grad=True)
    y = torchvision.ops.roi_align(tf, rois_from_batched(boxes), out, scale, sr, aligned)
    y.backward(nhwc_to_torch(cot.reshape(-1, out, out, f.shape[-1])))
    b, r = boxes.shape[:2]
    return torch_to_nhwc(y).reshape(b, r, out, out, -1), torch_to_nhwc(tf.grad)


# Tolerances: an output is a weighted sum of 4 * sampling_ratio**2 <= 64 taps
# of N(0, 1) features, a float32 sum within 64 * 6e-8 ~ 4e-6 of exact, and the
# sample points may differ by float32 roundings of coordinates up to ~20
# feature pixels (~1e-6 pixels, times a feature gradient of a few units): 1e-5.
# The gradient of a feature pixel sums the cotangents of every bin that taps
# it (a few hundred terms of N(0, 1)): 1e-4 absolute.
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
def test_forward_and_grad_match_torchvision(aligned, sampling_ratio, jit):
    rng = np.random.default_rng(sampling_ratio + 10 * aligned)
    f = rng.normal(size=(2, 12, 16, 5)).astype(np.float32)
    boxes = random_boxes(rng, (2, 9), (48, 64), max_size=40)
    boxes[0, 0] = [200, 200, 220, 230]  # wholly outside
    boxes[0, 1] = [10, 10, 10, 10]  # zero area
    boxes[1, 2] = [0, 0, 0, 0]  # padding
    boxes[1, 3] = [-30, -30, 70, 80]  # larger than the map
    out, scale = 7, 0.25
    cot = rng.normal(size=(2, 9, out, out, 5)).astype(np.float32)
    ref_y, ref_g = _torch_roi_align(f, boxes, out, scale, sampling_ratio, aligned, cot)

    def fwd(f, b):
        return ops.roi_align(f, b, out, scale, sampling_ratio, aligned)

    fwd = jax.jit(fwd) if jit else fwd
    y, vjp = jax.vjp(lambda x: fwd(x, boxes), jnp.asarray(f))
    (g,) = vjp(jnp.asarray(cot))
    chex.assert_shape(y, (2, 9, out, out, 5))
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-4)
    chex.assert_tree_all_finite(g)


def test_bfloat16_features():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(1, 10, 10, 4)).astype(np.float32)
    boxes = random_boxes(rng, (1, 5), (40, 40))
    y32 = ops.roi_align(f, boxes, 7, 0.25)
    y16 = ops.roi_align(jnp.asarray(f, jnp.bfloat16), boxes, 7, 0.25)
    assert y16.dtype == jnp.bfloat16
    # |f| < ~4: rounding the features to bfloat16 moves them by < 4 * 2**-9,
    # and the output's own rounding by < 4 * 2**-9 again: 1.6e-2 < 5e-2.
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2)


@pytest.mark.parametrize("num_boxes", [1, 2, 5, 8])
def test_pooling_loop_stitches_the_boxes_back_in_order(num_boxes):
    # The forward pools the boxes in two trips of a loop (R padded to even) so that its
    # output is written once (roi_align._pool_materialised): each box's value must be the
    # one a single vmapped pass gives. Both sum the same K = 4 taps in the same order, but
    # they are two programs, and XLA may contract a multiply-add into an FMA in one and not
    # the other (its legacy CPU emitters did here, by 2 ulp). Each sum of K products is
    # within K * 2**-24 * sum_k |w_k f_k| of the exact value either way (Higham's gamma_K),
    # so the two differ by at most twice that. A box stitched into another's place differs
    # by O(1): the second check shows that this bound would see it.
    from maskrcnn_jax.ops.roi_align import _pool_materialised, _pool_unrolled

    rng = np.random.default_rng(num_boxes)
    features = rng.normal(size=(2, 30, 3)).astype(np.float32)
    index = rng.integers(0, 30, size=(2, num_boxes, 2, 3, 4)).astype(np.int32)
    weight = rng.uniform(size=(2, num_boxes, 2, 3, 4)).astype(np.float32)
    out = np.asarray(jax.jit(_pool_materialised)(features, index, weight))
    chex.assert_shape(out, (2, num_boxes, 2, 3, 3))
    ref = np.asarray(jax.jit(jax.vmap(_pool_unrolled))(features, index, weight))
    taps = np.stack([f[i] for f, i in zip(features, index)])  # [2, R, 2, 3, K, C]
    k = index.shape[-1]
    bound = 2 * k * 2.0**-24 * np.sum(np.abs(weight[..., None] * taps), axis=-2)
    assert np.all(np.abs(out - ref) <= bound), np.max(np.abs(out - ref) - bound)
    if num_boxes > 1:  # each box in its neighbour's place: far outside the bound
        shifted = np.roll(out, 1, axis=1)
        assert np.all(np.any(np.abs(shifted - ref) > bound, axis=(2, 3, 4)))
