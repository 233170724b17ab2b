"""Pallas RoIAlign: forward and gradient equal to the vmap reference.

The suite runs once, compiled where the backend can compile Pallas (GPU) and
in the Pallas interpreter on CPU (``INTERPRET``); it never skips. Shapes are
small because interpret mode is slow. (``impl="pallas"`` of the public ops is
tested with the registry in test_poolers.py.) Tolerances: float32 1e-5; bfloat16
forward within one bfloat16 ulp (rtol 2**-7: both sides accumulate in float32
and round once). bfloat16 gradient: ours accumulates in float32 and rounds
once, so it is within rtol 2**-8 of the float32 gradient; the reference
scatter-adds in bfloat16 and is within 2**-5 of it in relative L2 norm, which
is the tolerance between the two.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import ops
from maskrcnn_jax.ops import roi_align_pallas as rap
from maskrcnn_jax.ops.roi_align_pallas import BlockSizes, roi_align_levels_pallas

INTERPRET = jax.default_backend() == "cpu"
# Small tiles so that the test shapes span several blocks and ragged edges.
SMALL = BlockSizes(block_bins=16, block_c=8)
LEVEL_SHAPES = ((12, 16), (6, 8))  # a 48 x 64 image at strides 4 and 8
SCALES = (0.25, 0.125)


def _boxes(rng, batch, num):
    """[batch, num, 4] random boxes, the first rows replaced by hard cases."""
    xy = rng.uniform(-0.1, 1.1, size=(batch, num, 2)) * [64, 48]
    wh = rng.uniform(0, 40, size=(batch, num, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    boxes[0, 0] = [200, 200, 220, 230]  # wholly outside
    boxes[0, 1] = [10, 10, 10, 10]  # zero area
    boxes[0, 2] = [30, 20, 25, 12]  # inverted (x2 < x1, y2 < y1)
    boxes[1, 0] = [0, 0, 0, 0]  # padding
    boxes[1, 1] = [-30, -30, 90, 70]  # larger than the map
    boxes[1, 2] = [63, 47, 64, 48]  # last pixel row and column
    return boxes


def _problem(seed, channels, num=9, dtype=np.float32):
    rng = np.random.default_rng(seed)
    n = sum(h * w for h, w in LEVEL_SHAPES)
    features = jnp.asarray(rng.normal(size=(2, n, channels)), dtype)
    boxes = jnp.asarray(_boxes(rng, 2, num))
    levels = jnp.asarray(rng.integers(0, len(LEVEL_SHAPES), size=(2, num)), jnp.int32)
    return rng, features, boxes, levels


def _reference(features, boxes, levels, out, sampling_ratio, aligned):
    return ops.roi_align_levels(
        features, boxes, levels, LEVEL_SHAPES, SCALES, out, sampling_ratio, aligned
    )


def _value_and_grad(fn, features, cot):
    y, vjp = jax.vjp(fn, features)
    return y, vjp(cot.astype(y.dtype))[0]


def _pallas(block_sizes=SMALL):
    def fn(f, b, l, out, sr, aligned):
        return roi_align_levels_pallas(
            f, b, l, LEVEL_SHAPES, SCALES, out, sr, aligned,
            block_sizes=block_sizes, interpret=INTERPRET,
        )  # fmt: skip

    return fn


# ------------------------------------------------- the kernel vs the reference


@pytest.mark.parametrize(
    "aligned, sampling_ratio, channels",
    [
        # C = 3 and 20 are not multiples of block_c = 8 (C = 3 also gets a
        # block of 4); R*oh*ow = 9*49 bins per image is not a multiple of
        # block_bins = 16.
        (False, 1, 3),
        (True, 1, 8),
        (False, 2, 20),
        (True, 2, 3),
    ],
)
def test_forward_and_grad_match_reference(aligned, sampling_ratio, channels):
    rng, f, boxes, levels = _problem(sampling_ratio + 10 * aligned, channels)
    out = 7
    cot = jnp.asarray(rng.normal(size=(2, boxes.shape[1], out, out, channels)), jnp.float32)
    pallas = _pallas()
    y, g = _value_and_grad(lambda x: pallas(x, boxes, levels, out, sampling_ratio, aligned), f, cot)
    ref_y, ref_g = _value_and_grad(
        lambda x: _reference(x, boxes, levels, out, sampling_ratio, aligned), f, cot
    )
    chex.assert_shape(y, (2, boxes.shape[1], out, out, channels))
    assert y.dtype == f.dtype and g.dtype == f.dtype
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)
    chex.assert_tree_all_finite(g)


def test_bfloat16():
    rng, f, boxes, levels = _problem(3, 20, dtype=jnp.bfloat16)
    out = (5, 4)  # non-square output
    cot = jnp.asarray(rng.normal(size=(2, boxes.shape[1], *out, 20)), jnp.bfloat16)
    pallas = _pallas()
    reference = lambda x: _reference(x, boxes, levels, out, 2, True)
    y, g = _value_and_grad(lambda x: pallas(x, boxes, levels, out, 2, True), f, cot)
    ref_y, ref_g = _value_and_grad(reference, f, cot)
    # float32 on the same (bfloat16-representable) inputs: the exact answer.
    _, g32 = _value_and_grad(reference, f.astype(jnp.float32), cot.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
    as32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(as32(y), as32(ref_y), rtol=2**-7, atol=2**-7)
    # Ours accumulates the gradient in float32 and rounds once.
    np.testing.assert_allclose(as32(g), g32, rtol=2**-8, atol=1e-6)
    # The reference scatter-adds in bfloat16, so it is only close in norm.
    rel = lambda a, b: np.linalg.norm(as32(a) - b) / np.linalg.norm(b)
    assert rel(g, g32) <= rel(ref_g, g32) <= 2**-5, (rel(g, g32), rel(ref_g, g32))


def test_large_sampling_ratio_uses_loop():
    # K = 4 * 3**2 = 36 taps > 16: the kernel's fori_loop path.
    _, f, boxes, levels = _problem(4, 8, num=4)
    y = _pallas()(f, boxes, levels, 2, 3, False)
    ref = _reference(f, boxes, levels, 2, 3, False)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_single_level_matches_roi_align():
    rng = np.random.default_rng(5)
    f = jnp.asarray(rng.normal(size=(2, 12, 16, 3)), jnp.float32)
    boxes = jnp.asarray(_boxes(rng, 2, 6))
    flat, shapes = ops.flatten_levels([f])
    levels = jnp.zeros(boxes.shape[:2], jnp.int32)
    # interpret=None: the automatic choice (the interpreter on CPU only).
    y = roi_align_levels_pallas(flat, boxes, levels, shapes, [0.25], 7, 2, True, block_sizes=SMALL)
    ref = ops.roi_align(f, boxes, 7, 0.25, 2, True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_multilevel_impl_pallas_matches_reference():
    rng = np.random.default_rng(6)
    image, strides = (64, 96), (4, 8, 16, 32)
    feats = [
        jnp.asarray(rng.normal(size=(2, image[0] // s, image[1] // s, 4)), jnp.float32)
        for s in strides
    ]
    xy = rng.uniform(0, 1, size=(2, 8, 2)) * [image[1], image[0]]
    wh = np.exp(rng.uniform(np.log(2), np.log(200), size=(2, 8, 2)))  # spans P2..P5
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 8, 7, 7, 4)), jnp.float32)

    def run(impl, **kw):
        fn = lambda fs: ops.multilevel_roi_align(fs, boxes, 7, strides, 2, impl=impl, **kw)
        return _value_and_grad(fn, feats, cot)

    y, g = run("pallas", block_sizes=SMALL, interpret=INTERPRET)
    ref_y, ref_g = run("reference")
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for gl, rl in zip(g, ref_g):
        np.testing.assert_allclose(gl, rl, rtol=1e-5, atol=1e-5)


def test_pool_kernel_matches_pool_reference():
    # The kernel alone, on the [K, P] tap layout, with default block sizes
    # under jit (P = 100 and C = 130 leave ragged tiles).
    rng = np.random.default_rng(8)
    features = jnp.asarray(rng.normal(size=(50, 130)), jnp.float32)
    index = jnp.asarray(rng.integers(0, 50, size=(4, 100)), jnp.int32)
    weight = jnp.asarray(rng.uniform(size=(4, 100)), jnp.float32)
    pool = jax.jit(rap.roi_align_pool, static_argnums=(3, 4))
    y = pool(features, index, weight, BlockSizes(), INTERPRET)
    np.testing.assert_allclose(
        y, rap.roi_align_pool_reference(features, index, weight), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------ API


def test_selected_by_impl():
    assert ops.get_roi_align_levels("pallas") is roi_align_levels_pallas


@pytest.mark.parametrize("block_bins, block_c", [(0, 8), (16, 12), (48, 8)])
def test_block_sizes_must_be_powers_of_two(block_bins, block_c):
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_bins, block_c)


def test_bad_shapes_raise():
    _, f, boxes, levels = _problem(9, 3, num=3)
    with pytest.raises(ValueError, match="levels must be"):
        roi_align_levels_pallas(f, boxes, levels[:, :1], LEVEL_SHAPES, SCALES, 7)
    with pytest.raises(ValueError, match="level_shapes cover"):
        roi_align_levels_pallas(f, boxes, levels, LEVEL_SHAPES[:1], SCALES[:1], 7)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_levels_pallas(f, boxes, levels, LEVEL_SHAPES, SCALES, 7, 0)


def test_lowers_to_triton_for_cuda():
    # Cross-lowers the compiled (non-interpret) kernel through Pallas-Triton
    # on any host: every op in the kernel must have a Triton lowering.
    f = jax.ShapeDtypeStruct((2, 240, 256), jnp.bfloat16)
    boxes = jax.ShapeDtypeStruct((2, 9, 4), jnp.float32)
    levels = jax.ShapeDtypeStruct((2, 9), jnp.int32)
    fn = jax.jit(
        lambda f, b, l: roi_align_levels_pallas(
            f, b, l, LEVEL_SHAPES, SCALES, 7, 2, False, interpret=False
        )
    )
    hlo = fn.trace(f, boxes, levels).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in hlo
