"""RoI geometry shared by the pooling implementations: hand-computed taps and checks.

Every value below is a dyadic rational of a few bits (sample points on
quarter pixels, weights 0, 1/4, 1/2, 3/4, 1), so float32 computes it exactly
and the comparisons are exact.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import roi_geometry as geo


def test_bilinear_axis_edge_rules():
    coords = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.25, 3.5, 4.0, 4.5, 5.0, 5.5], jnp.float32)
    low, high, w_low, w_high = geo.bilinear_axis(coords, jnp.int32(5))
    # Beyond one pixel outside: no weight. Up to one pixel before the first
    # centre: clamped to pixel 0. From the last centre on: clamped to pixel 4.
    np.testing.assert_array_equal(low, [0, 0, 0, 0, 0, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(high, [1, 1, 1, 1, 1, 4, 4, 4, 4, 4])
    np.testing.assert_array_equal(w_low, [0, 1, 1, 1, 0.75, 0.5, 1, 1, 1, 0])
    np.testing.assert_array_equal(w_high, [0, 0, 0, 0, 0.25, 0.5, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "box, aligned, ys",
    [
        ([1, 1, 3, 3], True, [[1.0, 2.0]]),  # starts at 0.5, bins of 2: quarter points
        ([1, 1, 3, 3], False, [[1.5, 2.5]]),
        ([2, 2, 2, 2], False, [[2.25, 2.75]]),  # empty box: at least one pixel wide
        ([2, 2, 2, 2], True, [[1.5, 1.5]]),  # aligned: no minimum size
    ],
)
def test_sample_points(box, aligned, ys):
    got_ys, got_xs = geo.sample_points(jnp.array(box, jnp.float32), 1.0, (1, 1), 2, aligned)
    np.testing.assert_array_equal(got_ys, ys)
    np.testing.assert_array_equal(got_xs, ys)  # square box: same along x


def test_box_samples_index_levels_and_sum_to_one():
    shapes, scales = ((8, 8), (4, 4)), (1.0, 0.5)
    geometry = geo.level_geometry(shapes, scales)
    box = jnp.array([1, 1, 5, 5], jnp.float32)  # inside both levels
    index0, weight0 = geo.box_samples(box, 0, *geometry, (2, 2), 2, False)
    index1, weight1 = geo.box_samples(box, 1, *geometry, (2, 2), 2, False)
    chex.assert_shape([index0, weight0, index1, weight1], (2, 2, 16))  # K = 4 * 2**2
    assert int(index0.max()) < 64 <= int(index1.min()) and int(index1.max()) < 64 + 16
    # Each bin averages bilinear interpolations: its weights sum to one.
    np.testing.assert_array_equal(weight0.sum(-1), np.ones((2, 2)))
    np.testing.assert_array_equal(weight1.sum(-1), np.ones((2, 2)))
    # Level 0, first bin: samples at x, y in {1.5, 2.5}: taps on pixels 1..3.
    rows, cols = np.divmod(np.asarray(index0[0, 0]), 8)
    assert set(rows.tolist()) == set(cols.tolist()) == {1, 2, 3}


def test_level_geometry_and_flatten_levels():
    features = [jnp.ones((2, 4, 6, 3)), jnp.zeros((2, 2, 3, 3))]
    flat, shapes = geo.flatten_levels(features)
    chex.assert_shape(flat, (2, 30, 3))
    assert shapes == [(4, 6), (2, 3)]
    np.testing.assert_array_equal(flat[:, :24], 1)
    np.testing.assert_array_equal(flat[:, 24:], 0)
    heights, widths, offsets, scales = geo.level_geometry(shapes, (0.25, 0.125))
    np.testing.assert_array_equal(heights, [4, 2])
    np.testing.assert_array_equal(widths, [6, 3])
    np.testing.assert_array_equal(offsets, [0, 24])
    np.testing.assert_array_equal(scales, [0.25, 0.125])
    with pytest.raises(ValueError, match="2 level shapes but 1 spatial scales"):
        geo.level_geometry(shapes, (0.25,))
    with pytest.raises(ValueError, match=r"level 1 must be \[2, H, W, 3\], got \(2, 2, 3, 4\)"):
        geo.flatten_levels([features[0], jnp.zeros((2, 2, 3, 4))])


def test_check_levels_args():
    f, boxes, levels = jnp.zeros((2, 30, 3)), jnp.zeros((2, 5, 4)), jnp.zeros((2, 5), jnp.int32)
    shapes = ((4, 6), (2, 3))
    assert geo.check_levels_args(f, boxes, levels, shapes, 7, 2) == ((7, 7), 2)
    assert geo.check_levels_args(f, boxes, levels, shapes, (5, 4), 2.0) == ((5, 4), 2)
    bad = [
        ((f[0], boxes, levels, shapes, 7, 2), "features must be"),
        ((f, boxes[:1], levels, shapes, 7, 2), "boxes must be"),
        ((f, boxes, levels[:, :2], shapes, 7, 2), "levels must be"),
        ((f, boxes, levels, shapes[:1], 7, 2), "level_shapes cover 24 pixels but features have 30"),
        ((f, boxes, levels, shapes, 7, 0), "sampling_ratio must be a static int >= 1"),
        ((f, boxes, levels, shapes, 7, 1.5), "sampling_ratio"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            geo.check_levels_args(*args)
