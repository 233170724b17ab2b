"""Gather-free RoIAlign (einsum): torchvision and reference parity, bf16 bound, no scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import ops
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.ops.roi_geometry import flatten_levels
from maskrcnn_jax.ops.roi_align_einsum import roi_align_levels_einsum
from tests.torch_ref import nhwc_to_torch, random_boxes, rois_from_batched, torch_to_nhwc

# float32 parity, the tolerances of issue 9: 1e-4 forward, 1e-3 gradient. Both
# sides sum the same nonnegative-weighted products in another order, which moves
# a sum of n terms by <= n * 6e-8 * sum |term|. Forward: <= 4 g**2 = 64 products
# per bin of |f| <= ~5 (weights sum to <= 1): <= 2e-5. Gradient: a feature pixel
# sums weight * cotangent (|cot| <= ~5) over the bins of the boxes near it, a few
# dozen terms here: ~50 * 6e-8 * 50 = 1.5e-4.
FWD_TOL = {"rtol": 1e-4, "atol": 1e-4}
GRAD_TOL = {"rtol": 1e-3, "atol": 1e-3}


def _single_level(f, boxes, out, scale, sampling_ratio, aligned, **kw):
    """roi_align_levels_einsum on one [B, H, W, C] map, torchvision.ops.roi_align's arguments."""
    flat, shapes = flatten_levels([f])
    levels = jnp.zeros(boxes.shape[:2], jnp.int32)
    return roi_align_levels_einsum(
        flat, boxes, levels, shapes, [scale], out, sampling_ratio, aligned, **kw
    )


def _arange_map():
    return jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)  # value = 5 y + x


@pytest.mark.parametrize(
    "aligned, box, expected",
    [
        # aligned: box [1,1,3,3] starts at 0.5, samples at 1.0 and 2.0 -> mean (1.5, 1.5)
        (True, [1, 1, 3, 3], 5 * 1.5 + 1.5),
        # not aligned: starts at 1, samples at 1.5 and 2.5 -> mean (2, 2)
        (False, [1, 1, 3, 3], 12.0),
        # last row/column: 4.5 is clamped to 4 -> (21 + 21.5 + 23.5 + 24) / 4
        (False, [3, 3, 5, 5], 22.5),
        # wholly outside (every sample beyond size = 5): zero
        (False, [10, 10, 12, 12], 0.0),
    ],
)
def test_one_bin_by_hand(aligned, box, expected):
    out = _single_level(_arange_map(), jnp.array([[box]], jnp.float32), 1, 1.0, 2, aligned)
    assert out.shape == (1, 1, 1, 1, 1)
    # Map values, sample positions and the 1/4 weights are dyadic rationals of a few bits,
    # and float32 features contract at HIGHEST precision: exact in any order.
    np.testing.assert_allclose(out[0, 0, 0, 0, 0], expected, rtol=1e-6)


def _torch_roi_align(f, boxes, out, scale, sr, aligned, cot):
    tf = nhwc_to_torch(f, requires_grad=True)
    y = torchvision.ops.roi_align(tf, rois_from_batched(boxes), out, scale, sr, aligned)
    y.backward(nhwc_to_torch(cot.reshape(-1, out, out, f.shape[-1])))
    b, r = boxes.shape[:2]
    return torch_to_nhwc(y).reshape(b, r, out, out, -1), torch_to_nhwc(tf.grad)


def _value_and_grad(fn, f, cot):
    """fn(f) and its VJP with cotangent ``cot``, compiled as one program."""

    @jax.jit
    def both(x, ct):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(ct)[0]

    y, g = both(jnp.asarray(f), jnp.asarray(cot))
    return np.asarray(y), np.asarray(g)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 4])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_and_grad_match_torchvision(aligned, sampling_ratio):
    rng = np.random.default_rng(sampling_ratio + 10 * aligned)
    f = rng.normal(size=(2, 12, 16, 5)).astype(np.float32)
    boxes = random_boxes(rng, (2, 9), (48, 64), max_size=40)
    boxes[0, 0] = [200, 200, 220, 230]  # wholly outside
    boxes[0, 1] = [10, 10, 10, 10]  # zero area
    boxes[1, 2] = [0, 0, 0, 0]  # padding
    boxes[1, 3] = [-30, -30, 70, 80]  # larger than the map
    boxes[1, 4] = [20, 5, 12, 30]  # x2 < x1: negative width
    out, scale = 7, 0.25
    cot = rng.normal(size=(2, 9, out, out, 5)).astype(np.float32)
    ref_y, ref_g = _torch_roi_align(f, boxes, out, scale, sampling_ratio, aligned, cot)

    # box_chunk=4 with R=9: three chunks, the last padded with 3 boxes.
    y, g = _value_and_grad(
        lambda x: _single_level(x, boxes, out, scale, sampling_ratio, aligned, box_chunk=4), f, cot
    )
    assert y.shape == (2, 9, out, out, 5) and g.shape == f.shape
    np.testing.assert_allclose(y, ref_y, **FWD_TOL)
    np.testing.assert_allclose(g, ref_g, **GRAD_TOL)
    assert np.isfinite(g).all()

    # And the repo's vmap reference, on the same arguments.
    flat, shapes = flatten_levels([f])
    levels = jnp.zeros((2, 9), jnp.int32)
    rl_y, rl_g = _value_and_grad(
        lambda x: roi_align_levels(
            x, boxes, levels, shapes, [scale], out, sampling_ratio, aligned
        ).reshape(y.shape),
        flat,
        cot,
    )
    np.testing.assert_allclose(y, rl_y, **FWD_TOL)
    np.testing.assert_allclose(g.reshape(rl_g.shape), rl_g, **GRAD_TOL)


def _multilevel_case(seed=7, channels=3):
    rng = np.random.default_rng(seed)
    image = (128, 160)
    strides = (4, 8, 16, 32)
    feats = [
        rng.normal(size=(2, image[0] // s, image[1] // s, channels)).astype(np.float32)
        for s in strides
    ]
    # Sizes spanning all levels (sqrt area from 4 to ~900 -> P2..P5 and clamping).
    boxes = random_boxes(rng, (2, 40), image, min_size=2, max_size=160)
    boxes[0, :5] = [
        [0, 0, 0, 0],
        [5, 5, 6, 6],
        [0, 0, 112, 112],
        [0, 0, 900, 900],
        [9, 9, 233, 233],
    ]
    return rng, image, strides, feats, boxes


@pytest.mark.parametrize("out", [7, 14])
def test_multilevel_matches_multiscale_roi_align(out):
    rng, image, strides, feats, boxes = _multilevel_case()
    cot = rng.normal(size=(2, 40, out, out, 3)).astype(np.float32)

    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], out, 2)
    tfeats = {str(i): nhwc_to_torch(f, requires_grad=True) for i, f in enumerate(feats)}
    ref = pooler(tfeats, [torch.from_numpy(b) for b in boxes], [image] * 2)
    ref.backward(nhwc_to_torch(cot.reshape(-1, out, out, 3)))
    ref_y = torch_to_nhwc(ref).reshape(2, 40, out, out, 3)
    ref_g = np.concatenate(
        [torch_to_nhwc(t.grad).reshape(2, -1, 3) for t in tfeats.values()], axis=1
    )  # [B, N, C], the layout of flatten_levels

    flat, shapes = flatten_levels(feats)
    levels = ops.assign_levels(boxes, 2, 5)
    assert set(np.unique(levels)) == {0, 1, 2, 3}  # every level is exercised
    scales = [1.0 / s for s in strides]

    def pool(impl, **kw):
        return lambda x: impl(x, boxes, levels, shapes, scales, out, 2, False, **kw)

    y, g = _value_and_grad(pool(roi_align_levels_einsum, box_chunk=16), flat, cot)
    np.testing.assert_allclose(y, ref_y, **FWD_TOL)
    np.testing.assert_allclose(g, ref_g, **GRAD_TOL)

    rl_y, rl_g = _value_and_grad(pool(roi_align_levels), flat, cot)
    np.testing.assert_allclose(y, rl_y, **FWD_TOL)
    np.testing.assert_allclose(g, rl_g, **GRAD_TOL)


def test_chunked_equals_unchunked():
    """Chunks only regroup boxes: the same products, summed in another order.

    The products themselves are identical (the per-box weights do not depend on
    the chunk), only the matmul blocking and the order of accumulation change.
    Two orders of a float32 sum of n terms differ by <= 2 n 2**-24 sum |term|,
    and since the weights are >= 0, sum |term| is the same pooling of |f| (forward,
    n <= H + W per output) or the VJP of |cotangent| (gradient, n <= R out_h out_w
    per feature pixel).
    """
    rng, _, strides, feats, boxes = _multilevel_case(seed=3)
    boxes = boxes[:, :10]
    flat, shapes = flatten_levels(feats)
    levels = ops.assign_levels(boxes, 2, 5)
    scales = [1.0 / s for s in strides]
    cot = rng.normal(size=(2, 10, 7, 7, 3)).astype(np.float32)

    def pool(chunk):
        return lambda x: roi_align_levels_einsum(
            x, boxes, levels, shapes, scales, 7, 2, False, box_chunk=chunk
        )

    y_all, g_all = _value_and_grad(pool(10), flat, cot)  # one chunk: the unchunked contraction
    y_abs, g_abs = _value_and_grad(pool(10), np.abs(flat), np.abs(cot))
    n_fwd = max(h + w for h, w in shapes)
    n_grad = 10 * 7 * 7
    for chunk in (1, 3):  # 10 chunks; 4 chunks, the last padded with 2 boxes
        y, g = _value_and_grad(pool(chunk), flat, cot)
        assert (np.abs(y - y_all) <= 2 * n_fwd * 2.0**-24 * y_abs + 1e-7).all(), chunk
        assert (np.abs(g - g_all) <= 2 * n_grad * 2.0**-24 * g_abs + 1e-7).all(), chunk
    # A chunk larger than R is clipped to R: the very same computation.
    np.testing.assert_array_equal(jax.jit(pool(1000))(flat), y_all)


def test_unassigned_level_pools_zero():
    _, _, strides, feats, boxes = _multilevel_case(seed=5)
    flat, shapes = flatten_levels(feats)
    levels = np.asarray(ops.assign_levels(boxes, 2, 5)).copy()
    levels[0, :3] = -1  # no such level
    levels[1, :2] = 4
    scales = [1.0 / s for s in strides]
    y = jax.jit(lambda x: roi_align_levels_einsum(x, boxes, levels, shapes, scales, 7))(flat)
    np.testing.assert_array_equal(y[0, :3], 0.0)
    np.testing.assert_array_equal(y[1, :2], 0.0)
    assert np.abs(np.asarray(y[0, 3:])).max() > 0.1


@pytest.mark.parametrize("aligned", [False, True])
def test_bfloat16_within_rounding_bound(aligned):
    """bfloat16 features: error bounded by the roundings the computation makes.

    bfloat16 keeps an 8-bit significand: a rounding moves a value by at most
    2**-8 ~ 3.9e-3 relative (the guide's ~4e-3; round-to-nearest halves it, kept
    as margin). Against float32 pooling of the *same* bfloat16-rounded features,
    the einsum path rounds each term sum_{y,x} Wy[i,y] Wx[j,x] f[y,x] four times:
    the entry of Wy, the entry of Wx, the intermediate sum_x Wx f (fed to the
    second product as bfloat16) and the output. The products accumulate in
    float32, which adds <= (H + W) * 2**-24 relative per term. So per element

      |ours - f32| <= (4 * 2**-8 + (H + W) * 2**-24) * sum |Wy Wx f|,

    and since the weights are >= 0, sum |Wy Wx f| is RoIAlign of |f|. (A bf16
    accumulation would add a rounding per accumulated term and may exceed it.)
    """
    rng = np.random.default_rng(11 + aligned)
    h, w = 20, 24
    f = jnp.asarray(rng.normal(size=(2, h, w, 8)).astype(np.float32), jnp.bfloat16)
    boxes = random_boxes(rng, (2, 12), (4 * h, 4 * w), max_size=60)
    boxes[0, 0] = [0, 0, 0, 0]  # padding
    f32 = f.astype(jnp.float32)
    y16 = jax.jit(lambda x: _single_level(x, boxes, 7, 0.25, 2, aligned, box_chunk=5))(f)
    assert y16.dtype == jnp.bfloat16
    exact = ops.roi_align(f32, boxes, 7, 0.25, 2, aligned)  # the float32 vmap reference
    magnitude = ops.roi_align(jnp.abs(f32), boxes, 7, 0.25, 2, aligned)
    bound = (4 * 2.0**-8 + (h + w) * 2.0**-24) * np.asarray(magnitude) + 1e-7
    err = np.abs(np.asarray(y16, np.float32) - np.asarray(exact))
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"
    # The bound is not vacuous: bfloat16 does differ from float32 here.
    assert err.max() > 0


def _primitive_names(jaxpr):
    """Names of every primitive in a jaxpr, recursing into scan / jit / cond bodies."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns"):  # Jaxpr
                    yield from _primitive_names(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
                    yield from _primitive_names(sub.jaxpr)


_INDEXED = ("gather", "scatter", "scatter-add", "scatter_add", "dynamic_slice")


@pytest.mark.parametrize(
    "impl, indexed",
    [(roi_align_levels_einsum, False), (roi_align_levels, True)],  # the reference: control
)
def test_gradient_has_no_gather_or_scatter(impl, indexed):
    _, _, strides, feats, boxes = _multilevel_case(seed=1)
    flat, shapes = flatten_levels(feats)
    levels = ops.assign_levels(boxes, 2, 5)
    scales = [1.0 / s for s in strides]

    def loss(x):
        return (impl(x, boxes, levels, shapes, scales, 7, 2, False) ** 2).sum()

    grad = jax.grad(loss)
    names = set(_primitive_names(jax.make_jaxpr(grad)(flat).jaxpr))
    hlo = jax.jit(grad).lower(flat).as_text()
    found = sorted(n for n in names if any(n.startswith(p) for p in _INDEXED))
    if indexed:
        assert "gather" in names and any(n.startswith("scatter") for n in names), names
    else:
        assert "dot_general" in names and "scan" in names
        assert not found, found
        assert "gather" not in hlo and "scatter" not in hlo


@pytest.mark.parametrize("box_chunk", [0, -3, 2.5, True])
def test_bad_box_chunk_refused(box_chunk):
    with pytest.raises(ValueError, match="box_chunk"):
        _single_level(_arange_map(), jnp.zeros((1, 2, 4)), 2, 1.0, 2, False, box_chunk=box_chunk)


def test_mismatched_scales_refused():
    flat, shapes = flatten_levels([_arange_map()])
    with pytest.raises(ValueError, match="spatial scales"):
        roi_align_levels_einsum(
            flat, jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), int), shapes, [1, 2], 2
        )
