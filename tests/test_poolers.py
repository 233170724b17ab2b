"""RoI poolers: level assignment, multi-level pooling and the ``impl`` registry."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

from maskrcnn_jax import ops
from maskrcnn_jax.modeling import get_model_config
from maskrcnn_jax.ops import poolers
from maskrcnn_jax.ops.roi_align import roi_align_levels
from maskrcnn_jax.ops.roi_align_einsum import roi_align_levels_einsum
from maskrcnn_jax.ops.roi_align_pallas import BlockSizes, roi_align_levels_pallas
from tests.torch_ref import nhwc_to_torch, random_boxes, torch_to_nhwc

STRIDES = (4, 8, 16, 32)  # torchvision's MultiScaleRoIAlign on P2..P5
SMALL = BlockSizes(block_bins=16, block_c=8)  # several Pallas blocks on tiny shapes


def _pyramid(rng, image, channels, batch=2):
    return [
        rng.normal(size=(batch, image[0] // s, image[1] // s, channels)).astype(np.float32)
        for s in STRIDES
    ]


# ----------------------------------------------------------------- levels


def test_assign_levels_by_hand():
    boxes = jnp.array(
        [[0, 0, 224, 224], [0, 0, 223, 223], [0, 0, 448, 448], [0, 0, 0, 0], [0, 0, 2000, 2000]],
        jnp.float32,
    )
    # sqrt(area) 224 -> P4; just below -> P3; 448 -> P5; empty -> P2; huge -> clamped to P5.
    np.testing.assert_array_equal(ops.assign_levels(boxes), [2, 1, 3, 0, 3])


def test_assign_levels_matches_torchvision_level_mapper():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, (500,), (800, 800), min_size=1, max_size=900)
    ours = np.asarray(ops.assign_levels(boxes, 2, 5))
    ref = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy()
    # No box lies within float32 reach of a level boundary, where libm's log2
    # and XLA's could round to different sides: the comparison is exact.
    level = 4 + np.log2(np.sqrt(ops.box_area(boxes)) / 224.0)
    assert np.min(np.abs(level - np.round(level))) > 1e-4
    assert len(set(ref.tolist())) == 4  # every level is exercised
    np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------ multilevel


# Tolerance 1e-5: as test_roi_align.py's parity test (<= 16 taps per bin).
@pytest.mark.parametrize("out", [7, 14])
def test_multilevel_matches_multiscale_roi_align(out):
    rng = np.random.default_rng(7)
    image = (128, 160)
    feats = _pyramid(rng, image, 3)
    # Sizes spanning all levels (sqrt area from 4 to ~900 -> P2..P5 and clamping).
    boxes = random_boxes(rng, (2, 40), image, min_size=2, max_size=160)
    boxes[0, :4] = [[0, 0, 0, 0], [5, 5, 6, 6], [0, 0, 112, 112], [0, 0, 900, 900]]
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], out, 2)
    tfeats = {str(i): nhwc_to_torch(f) for i, f in enumerate(feats)}
    ref = pooler(tfeats, [torch.from_numpy(b) for b in boxes], [image] * 2)
    ref = torch_to_nhwc(ref).reshape(2, 40, out, out, 3)
    ours = jax.jit(lambda fs, b: ops.multilevel_roi_align(fs, b, out, STRIDES, 2))(feats, boxes)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_multilevel_needs_one_stride_per_level():
    feats = _pyramid(np.random.default_rng(0), (64, 64), 2)
    with pytest.raises(ValueError, match="4 feature levels but 3 strides"):
        ops.multilevel_roi_align(feats, jnp.zeros((2, 1, 4)), 7, STRIDES[:3])


# -------------------------------------------------------------- registry


def test_registry_names_and_functions():
    assert ops.roi_align_impl_names() == ("reference", "pallas", "einsum", "auto")
    assert ops.ROI_ALIGN_IMPLS == {
        "reference": roi_align_levels,
        "pallas": roi_align_levels_pallas,
        "einsum": roi_align_levels_einsum,
    }
    for name, fn in ops.ROI_ALIGN_IMPLS.items():
        assert ops.get_roi_align_levels(name) is fn
        assert ops.resolve_roi_align_impl(name) == name


@pytest.mark.parametrize(
    "backend, expected",
    # GPU: the Pallas kernel, which the device check has proven on a card (poolers.PALLAS_PROVEN_ON_GPU).
    [("cpu", "reference"), ("tpu", "einsum"), ("gpu", "pallas")]
)
def test_auto_picks_by_backend(monkeypatch, backend, expected):
    assert poolers.PALLAS_PROVEN_ON_GPU, "auto may pick pallas on GPU only once a card is recorded"
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ops.resolve_roi_align_impl("auto") == expected
    assert ops.get_roi_align_levels("auto") is ops.ROI_ALIGN_IMPLS[expected]


def test_auto_is_the_reference_on_this_cpu():
    assert jax.default_backend() == "cpu"  # tests/conftest.py
    assert ops.get_roi_align_levels("auto") is roi_align_levels


def test_unknown_impl_is_a_one_line_error():
    expected = "roi_align impl must be one of 'reference', 'pallas', 'einsum', 'auto', got 'fast'"
    f, boxes = jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 3, 4))
    calls = [
        lambda: ops.get_roi_align_levels("fast"),
        lambda: ops.roi_align(f, boxes, 7, impl="fast"),
        lambda: ops.multilevel_roi_align([f] * 4, boxes, 7, impl="fast"),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == expected


def test_model_config_accepts_exactly_the_registry_names():
    for name in ops.roi_align_impl_names():
        assert get_model_config(roi_align_impl=name).roi_align_impl == name
    with pytest.raises(ValueError, match="roi_align_impl='fast'"):
        get_model_config(roi_align_impl="fast")


def test_roi_align_impl_argument():
    rng = np.random.default_rng(2)
    f = jnp.asarray(rng.normal(size=(2, 12, 16, 3)), jnp.float32)
    boxes = jnp.asarray(random_boxes(rng, (2, 5), (48, 64)))
    ref = ops.roi_align(f, boxes, 7, 0.25, 2, True)
    # "reference" is the default and "auto" is the same function on CPU.
    np.testing.assert_array_equal(ops.roi_align(f, boxes, 7, 0.25, 2, True, impl="auto"), ref)
    y = ops.roi_align(f, boxes, 7, 0.25, 2, True, impl="pallas", block_sizes=SMALL)
    chex.assert_shape(y, (2, 5, 7, 7, 3))
    # <= 16 taps per bin, in the same order, accumulated in float32 on both sides.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_multilevel_impl_argument():
    rng = np.random.default_rng(4)
    image = (64, 96)
    feats = [jnp.asarray(f) for f in _pyramid(rng, image, 4)]
    boxes = jnp.asarray(random_boxes(rng, (2, 6), image, min_size=2, max_size=96))
    ref = ops.multilevel_roi_align(feats, boxes, 7, STRIDES)
    y = ops.multilevel_roi_align(feats, boxes, 7, STRIDES, impl="pallas", block_sizes=SMALL)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_a_registered_impl_gets_the_contract(monkeypatch):
    # How a new implementation plugs in: one registry entry. It receives the
    # flattened levels, each box's level, static shapes and scales, and the
    # impl_kwargs; strides default to P2..P5 of FPN_STRIDES.
    calls = []

    def spy(features, boxes, levels, level_shapes, spatial_scales, *args, **kwargs):
        calls.append((features, levels, level_shapes, spatial_scales, kwargs))
        return roi_align_levels(features, boxes, levels, level_shapes, spatial_scales, *args)

    monkeypatch.setitem(poolers.ROI_ALIGN_IMPLS, "spy", spy)
    assert "spy" in ops.roi_align_impl_names()
    rng = np.random.default_rng(5)
    image = (64, 96)
    feats = [jnp.asarray(f) for f in _pyramid(rng, image, 2)]
    boxes = jnp.asarray(random_boxes(rng, (2, 6), image, min_size=2, max_size=96))
    y = ops.multilevel_roi_align(feats, boxes, (5, 4), impl="spy", flag=1)
    np.testing.assert_array_equal(y, ops.multilevel_roi_align(feats, boxes, (5, 4), STRIDES))
    ((flat, levels, shapes, scales, kwargs),) = calls
    chex.assert_shape(flat, (2, sum(h * w for h, w in shapes), 2))
    assert shapes == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert tuple(ops.FPN_STRIDES[:4]) == STRIDES
    np.testing.assert_array_equal(levels, ops.assign_levels(boxes))
    assert kwargs == {"flag": 1}


# ----------------------------------------------------------------- roi_pooler


def test_multilevel_roi_pool_is_torchvision_roi_pool_on_each_boxs_level():
    rng = np.random.default_rng(11)
    image = (128, 160)
    feats = _pyramid(rng, image, 3)
    boxes = random_boxes(rng, (2, 24), image, min_size=2, max_size=160)
    boxes[0, :3] = [[0, 0, 0, 0], [0, 0, 112, 112], [-20, -10, 900, 900]]
    ours = jax.jit(lambda fs, b: ops.multilevel_roi_pool(fs, b, (7, 5), STRIDES))(feats, boxes)
    ours = np.asarray(ours)
    mapper = LevelMapper(2, 5)
    for i in range(2):
        tboxes = torch.from_numpy(boxes[i])
        levels = mapper([tboxes]).numpy()
        for lvl, stride in enumerate(STRIDES):
            pooled = torchvision.ops.roi_pool(
                nhwc_to_torch(feats[lvl][i : i + 1]), [tboxes], (7, 5), 1.0 / stride
            )
            sel = levels == lvl
            # A max of float32 values: exact.
            np.testing.assert_array_equal(ours[i, sel], torch_to_nhwc(pooled)[sel])
    assert len(set(LevelMapper(2, 5)([torch.from_numpy(boxes[0])]).tolist())) > 1


@pytest.mark.parametrize("pooler", ["align", "align_v2", "pool"])
def test_multilevel_roi_pooler_dispatches_each_pooler(pooler):
    rng = np.random.default_rng(12)
    image = (64, 96)
    feats = [jnp.asarray(f) for f in _pyramid(rng, image, 3)]
    boxes = jnp.asarray(random_boxes(rng, (2, 16), image, min_size=2, max_size=90))
    ours = ops.multilevel_roi_pooler(feats, boxes, 7, STRIDES, pooler=pooler, sampling_ratio=2)
    expected = {
        "align": ops.multilevel_roi_align(feats, boxes, 7, STRIDES, 2, aligned=False),
        "align_v2": ops.multilevel_roi_align(feats, boxes, 7, STRIDES, 2, aligned=True),
        "pool": ops.multilevel_roi_pool(feats, boxes, 7, STRIDES),
    }
    # The same function on the same inputs: equal bit for bit.
    np.testing.assert_array_equal(ours, expected[pooler])
    for other, value in expected.items():
        if other != pooler:
            assert not np.allclose(ours, value, atol=1e-3), other


def test_multilevel_roi_pooler_passes_impl_to_the_align_variants_only(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[7])  # aligned
        return roi_align_levels(*args, **kwargs)

    monkeypatch.setitem(poolers.ROI_ALIGN_IMPLS, "spy", spy)
    feats = [jnp.ones((1, 64 // s, 64 // s, 2)) for s in STRIDES]
    boxes = jnp.asarray([[[0.0, 0.0, 30.0, 20.0]]])
    for pooler in ("align", "align_v2", "pool"):
        ops.multilevel_roi_pooler(feats, boxes, 7, STRIDES, pooler=pooler, impl="spy")
    assert calls == [False, True]  # "pool" never reaches an align implementation


def test_unknown_roi_pooler_is_a_one_line_error():
    feats = [jnp.ones((1, 64 // s, 64 // s, 2)) for s in STRIDES]
    with pytest.raises(ValueError) as e:
        ops.multilevel_roi_pooler(feats, jnp.zeros((1, 1, 4)), 7, STRIDES, pooler="roi_pool")
    msg = str(e.value)
    assert "\n" not in msg and all(repr(n) in msg for n in ops.ROI_POOLERS) and "'roi_pool'" in msg
    assert "pool" not in poolers.roi_align_impl_names()  # RoIPool is not an align impl
