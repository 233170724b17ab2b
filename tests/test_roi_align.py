"""RoIAlign: hand-computed values, torchvision parity (forward and gradient)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from absl.testing import parameterized

from maskrcnn_jax import ops
from tests.torch_ref import nhwc_to_torch, random_boxes, rois_from_batched, torch_to_nhwc


def _arange_map():
    return jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)  # value = 5 y + x


class GoldenTest(parameterized.TestCase):
    @parameterized.parameters(
        # aligned: box [1,1,3,3] starts at 0.5, samples at 1.0 and 2.0 -> mean (1.5, 1.5)
        (True, [1, 1, 3, 3], 5 * 1.5 + 1.5),
        # not aligned: starts at 1, samples at 1.5 and 2.5 -> mean (2, 2)
        (False, [1, 1, 3, 3], 12.0),
        # last row/column: y = 4.5 is clamped to 4 -> (21 + 21.5 + 23.5 + 24) / 4
        (False, [3, 3, 5, 5], 22.5),
        # wholly outside (samples beyond size + 1... > 5): zero
        (False, [10, 10, 12, 12], 0.0),
    )
    def test_one_bin(self, aligned, box, expected):
        out = ops.roi_align(_arange_map(), jnp.array([[box]], jnp.float32), 1, 1.0, 2, aligned)
        chex.assert_shape(out, (1, 1, 1, 1, 1))
        np.testing.assert_allclose(out[0, 0, 0, 0, 0], expected, rtol=1e-6)

    def test_linear_map_is_reproduced_inside(self):
        # Bilinear interpolation of a linear function is exact: bin centres.
        out = ops.roi_align(_arange_map(), jnp.array([[[0, 0, 4, 4]]], jnp.float32), 2, 1.0, 2, True)
        # aligned: start -0.5, bins of 2 -> centres at 0.5 and 2.5
        expected = np.array([[5 * 0.5 + 0.5, 5 * 0.5 + 2.5], [5 * 2.5 + 0.5, 5 * 2.5 + 2.5]])
        np.testing.assert_allclose(out[0, 0, :, :, 0], expected, rtol=1e-6)

    def test_adaptive_sampling_refused(self):
        with pytest.raises(ValueError, match="sampling_ratio"):
            ops.roi_align(_arange_map(), jnp.zeros((1, 1, 4)), 2, 1.0, 0)


def _torch_roi_align(f, boxes, out, scale, sr, aligned, cot):
    tf = nhwc_to_torch(f, requires_grad=True)
    y = torchvision.ops.roi_align(tf, rois_from_batched(boxes), out, scale, sr, aligned)
    y.backward(nhwc_to_torch(cot.reshape(-1, out, out, f.shape[-1])))
    b, r = boxes.shape[:2]
    return torch_to_nhwc(y).reshape(b, r, out, out, -1), torch_to_nhwc(tf.grad)


class ParityTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(aligned=(False, True), sampling_ratio=(1, 2, 4))
    def test_forward_and_grad(self, aligned, sampling_ratio):
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

        y, vjp = jax.vjp(lambda x: self.variant(fwd)(x, boxes), jnp.asarray(f))
        (g,) = vjp(jnp.asarray(cot))
        chex.assert_shape(y, (2, 9, out, out, 5))
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-4)
        chex.assert_tree_all_finite(g)

    def test_multilevel_matches_multiscale_roi_align(self):
        rng = np.random.default_rng(7)
        image = (128, 160)
        strides = (4, 8, 16, 32)
        feats = [rng.normal(size=(2, image[0] // s, image[1] // s, 3)).astype(np.float32) for s in strides]
        # Sizes spanning all levels (sqrt area from 4 to ~900 -> P2..P5 and clamping).
        boxes = random_boxes(rng, (2, 40), image, min_size=2, max_size=160)
        boxes[0, :4] = [[0, 0, 0, 0], [5, 5, 6, 6], [0, 0, 112, 112], [0, 0, 900, 900]]
        for out in (7, 14):
            pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], out, 2)
            tfeats = {str(i): nhwc_to_torch(f) for i, f in enumerate(feats)}
            ref = pooler(tfeats, [torch.from_numpy(b) for b in boxes], [image] * 2)
            ref = torch_to_nhwc(ref).reshape(2, 40, out, out, 3)
            ours = jax.jit(lambda fs, b: ops.multilevel_roi_align(fs, b, out, strides, 2))(feats, boxes)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

    def test_assign_levels(self):
        boxes = jnp.array([[0, 0, 224, 224], [0, 0, 223, 223], [0, 0, 448, 448], [0, 0, 0, 0], [0, 0, 2000, 2000]], jnp.float32)
        np.testing.assert_array_equal(ops.assign_levels(boxes), [2, 1, 3, 0, 3])

    def test_bfloat16_features(self):
        rng = np.random.default_rng(1)
        f = rng.normal(size=(1, 10, 10, 4)).astype(np.float32)
        boxes = random_boxes(rng, (1, 5), (40, 40))
        y32 = ops.roi_align(f, boxes, 7, 0.25)
        y16 = ops.roi_align(jnp.asarray(f, jnp.bfloat16), boxes, 7, 0.25)
        assert y16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=5e-2)
