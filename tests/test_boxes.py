"""Box area / clip / IoU / coding against torchvision, plus invariants."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from maskrcnn_jax import ops
from tests.torch_ref import random_boxes

EPS32 = 2.0**-24  # float32 unit roundoff: one correctly rounded op is within EPS32 relative


class Boxes(NamedTuple):
    rng: np.random.Generator  # continues after drawing a and b
    a: np.ndarray  # [17, 4]
    b: np.ndarray  # [23, 4]


@pytest.fixture
def boxes() -> Boxes:
    rng = np.random.default_rng(0)
    a = random_boxes(rng, (17,), (100, 120), min_size=1)
    b = random_boxes(rng, (23,), (100, 120), min_size=1)
    # Degenerate and identical boxes.
    b[0] = a[0]
    b[1] = [10, 10, 10, 30]
    return Boxes(rng, a, b)


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [True, False])
def test_iou_matches_torchvision(boxes, jit):
    ours = _maybe_jit(ops.box_iou, jit)(boxes.a, boxes.b)
    ref = torchvision.ops.box_iou(torch.from_numpy(boxes.a), torch.from_numpy(boxes.b)).numpy()
    chex.assert_shape(ours, (17, 23))
    # Both evaluate inter / (a1 + a2 - inter) in float32, but a compiler may
    # order or fuse (multiply-add) the operations differently. Per side: each
    # width and height 1 rounding, the areas and the intersection 3, the union
    # 2 more on terms summing to <= 2 * union (12 EPS32), the quotient 1:
    # within 16 EPS32 of exact, so the two agree within 32 EPS32 ~ 1.9e-6
    # relative (the former 1e-6 was tighter than that). Disjoint: exactly 0.
    np.testing.assert_allclose(ours, ref, rtol=32 * EPS32, atol=0)


def test_iou_batched_and_empty_union_is_zero(boxes):
    batched = ops.box_iou(jnp.stack([boxes.a, boxes.a]), jnp.stack([boxes.b, boxes.b]))
    chex.assert_shape(batched, (2, 17, 23))
    np.testing.assert_array_equal(batched[1], ops.box_iou(boxes.a, boxes.b))
    zeros = jnp.zeros((3, 4))
    iou = ops.box_iou(zeros, zeros)
    assert bool(jnp.all(iou == 0))  # torchvision gives NaN here


@pytest.mark.parametrize("jit", [True, False])
def test_area_and_clip_match_torchvision(boxes, jit):
    # Area: two differences and a product, 3 roundings per side: the two agree
    # within 6 EPS32 = 3.6e-7 relative, inside rtol=1e-6.
    np.testing.assert_allclose(
        _maybe_jit(ops.box_area, jit)(boxes.a),
        torchvision.ops.box_area(torch.from_numpy(boxes.a)).numpy(),
        rtol=1e-6,
    )
    # Clipping only selects values: exact.
    clipped = _maybe_jit(lambda b: ops.clip_boxes(b, (100, 120)), jit)(boxes.a)
    ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes.a), (100, 120)).numpy()
    np.testing.assert_array_equal(clipped, ref)


def test_clip_per_image_sizes(boxes):
    stacked = np.stack([boxes.a, boxes.a])
    sizes = np.array([[100, 120], [50, 60]], np.float32)
    clipped = ops.clip_boxes(stacked, sizes)
    np.testing.assert_array_equal(clipped[1], ops.clip_boxes(boxes.a, (50, 60)))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_box_coder(boxes, weights):
    rng = boxes.rng
    anchors = random_boxes(rng, (40,), (200, 200), min_size=4)
    gt = random_boxes(rng, (40,), (200, 200), min_size=4)
    coder = BoxCoder(weights)
    ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    ours = ops.encode_boxes(gt, anchors, weights)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    deltas = rng.normal(size=(40, 4)).astype(np.float32) * 3  # some beyond the clamp
    ref_dec = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(
        ops.decode_boxes(deltas, anchors, weights), ref_dec, rtol=1e-5, atol=1e-3
    )


def test_decode_per_class_layout(boxes):
    rng = boxes.rng
    anchors = random_boxes(rng, (5,), (200, 200), min_size=4)
    deltas = rng.normal(size=(5, 3 * 4)).astype(np.float32)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    ours = ops.decode_boxes(deltas.reshape(5, 3, 4), anchors[:, None], ops.ROI_BOX_WEIGHTS)
    np.testing.assert_allclose(ours.reshape(5, 12), ref, rtol=1e-5, atol=1e-3)


def test_round_trip(boxes):
    rng = boxes.rng
    anchors = random_boxes(rng, (50,), (300, 300), min_size=2)
    targets = random_boxes(rng, (50,), (300, 300), min_size=2)
    for w in (ops.RPN_BOX_WEIGHTS, ops.ROI_BOX_WEIGHTS):
        back = ops.decode_boxes(ops.encode_boxes(targets, anchors, w), anchors, w)
        np.testing.assert_allclose(back, targets, rtol=1e-4, atol=1e-3)


def test_decode_clamps_scale():
    anchor = jnp.array([[0.0, 0.0, 16.0, 16.0]])
    huge = ops.decode_boxes(jnp.array([[0.0, 0.0, 100.0, 100.0]]), anchor)
    np.testing.assert_allclose(huge[0, 2] - huge[0, 0], 1000.0, rtol=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        ops.box_iou(jnp.zeros((3, 5)), jnp.zeros((3, 4)))
