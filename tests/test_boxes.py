"""Box area / clip / IoU / coding against torchvision, plus invariants."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from absl.testing import parameterized
from torchvision.models.detection._utils import BoxCoder

from maskrcnn_jax import ops
from tests.torch_ref import random_boxes


class BoxesTest(parameterized.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(0)
        self.a = random_boxes(self.rng, (17,), (100, 120), min_size=1)
        self.b = random_boxes(self.rng, (23,), (100, 120), min_size=1)
        # Degenerate and identical boxes.
        self.b[0] = self.a[0]
        self.b[1] = [10, 10, 10, 30]

    @chex.variants(with_jit=True, without_jit=True)
    def test_iou_matches_torchvision(self):
        ours = self.variant(ops.box_iou)(self.a, self.b)
        ref = torchvision.ops.box_iou(torch.from_numpy(self.a), torch.from_numpy(self.b)).numpy()
        chex.assert_shape(ours, (17, 23))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)

    def test_iou_batched_and_empty_union_is_zero(self):
        batched = ops.box_iou(jnp.stack([self.a, self.a]), jnp.stack([self.b, self.b]))
        chex.assert_shape(batched, (2, 17, 23))
        zeros = jnp.zeros((3, 4))
        iou = ops.box_iou(zeros, zeros)
        self.assertTrue(bool(jnp.all(iou == 0)))  # torchvision gives NaN here

    @chex.variants(with_jit=True, without_jit=True)
    def test_area_and_clip_match_torchvision(self):
        np.testing.assert_allclose(
            self.variant(ops.box_area)(self.a),
            torchvision.ops.box_area(torch.from_numpy(self.a)).numpy(),
            rtol=1e-6,
        )
        clipped = self.variant(lambda b: ops.clip_boxes(b, (100, 120)))(self.a)
        ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(self.a), (100, 120)).numpy()
        np.testing.assert_array_equal(clipped, ref)

    def test_clip_per_image_sizes(self):
        boxes = np.stack([self.a, self.a])
        sizes = np.array([[100, 120], [50, 60]], np.float32)
        clipped = ops.clip_boxes(boxes, sizes)
        np.testing.assert_array_equal(clipped[1], ops.clip_boxes(self.a, (50, 60)))

    @parameterized.parameters((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0))
    def test_encode_decode_match_box_coder(self, *weights):
        anchors = random_boxes(self.rng, (40,), (200, 200), min_size=4)
        gt = random_boxes(self.rng, (40,), (200, 200), min_size=4)
        coder = BoxCoder(weights)
        ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
        ours = ops.encode_boxes(gt, anchors, weights)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
        deltas = self.rng.normal(size=(40, 4)).astype(np.float32) * 3  # some beyond the clamp
        ref_dec = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
        np.testing.assert_allclose(
            ops.decode_boxes(deltas, anchors, weights), ref_dec, rtol=1e-5, atol=1e-3
        )

    def test_decode_per_class_layout(self):
        anchors = random_boxes(self.rng, (5,), (200, 200), min_size=4)
        deltas = self.rng.normal(size=(5, 3 * 4)).astype(np.float32)
        coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        ref = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
        ours = ops.decode_boxes(deltas.reshape(5, 3, 4), anchors[:, None], ops.ROI_BOX_WEIGHTS)
        np.testing.assert_allclose(ours.reshape(5, 12), ref, rtol=1e-5, atol=1e-3)

    def test_round_trip(self):
        anchors = random_boxes(self.rng, (50,), (300, 300), min_size=2)
        boxes = random_boxes(self.rng, (50,), (300, 300), min_size=2)
        for w in (ops.RPN_BOX_WEIGHTS, ops.ROI_BOX_WEIGHTS):
            back = ops.decode_boxes(ops.encode_boxes(boxes, anchors, w), anchors, w)
            np.testing.assert_allclose(back, boxes, rtol=1e-4, atol=1e-3)

    def test_decode_clamps_scale(self):
        anchor = jnp.array([[0.0, 0.0, 16.0, 16.0]])
        huge = ops.decode_boxes(jnp.array([[0.0, 0.0, 100.0, 100.0]]), anchor)
        np.testing.assert_allclose(huge[0, 2] - huge[0, 0], 1000.0, rtol=1e-5)

    def test_bad_shapes_raise(self):
        with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
            ops.box_iou(jnp.zeros((3, 5)), jnp.zeros((3, 4)))
