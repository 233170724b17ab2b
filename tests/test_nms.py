"""Static-shape NMS against torchvision.ops.nms / batched_nms."""

import chex
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from absl.testing import parameterized

from maskrcnn_jax import ops
from tests.torch_ref import random_boxes


def _kept(indices, valid):
    return np.asarray(indices)[np.asarray(valid)]


class NmsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0, 0.5), (1, 0.7), (2, 0.3))
    def test_matches_torchvision(self, seed, thr):
        rng = np.random.default_rng(seed)
        boxes = random_boxes(rng, (300,), (200, 200), min_size=5, max_size=60)
        scores = rng.uniform(size=300).astype(np.float32)
        scores[::7] = scores[0]  # ties, resolved by index as torchvision does
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        idx, valid = self.variant(lambda b, s: ops.nms(b, s, thr, 300))(boxes, scores)
        chex.assert_shape([idx, valid], (300,))
        np.testing.assert_array_equal(_kept(idx, valid), ref)
        # Truncation keeps the first max_outputs in the same order.
        idx, valid = self.variant(lambda b, s: ops.nms(b, s, thr, 10))(boxes, scores)
        np.testing.assert_array_equal(_kept(idx, valid), ref[:10])

    @chex.variants(with_jit=True, without_jit=True)
    def test_batched_matches_torchvision(self):
        rng = np.random.default_rng(3)
        boxes = random_boxes(rng, (200,), (100, 100), min_size=5, max_size=50)
        scores = rng.uniform(size=200).astype(np.float32)
        labels = rng.integers(0, 5, size=200).astype(np.int32)
        ref = torchvision.ops.batched_nms(
            torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5
        ).numpy()
        idx, valid = self.variant(lambda b, s, l: ops.batched_nms(b, s, l, 0.5, 250))(
            boxes, scores, labels
        )
        chex.assert_shape(idx, (250,))
        np.testing.assert_array_equal(_kept(idx, valid), ref)

    def test_invalid_entries_never_kept_or_suppress(self):
        boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11]], jnp.float32)
        scores = jnp.array([0.9, 0.8, 0.7])
        valid = jnp.array([False, True, True])
        idx, ok = ops.nms(boxes, scores, 0.5, 3, valid)
        np.testing.assert_array_equal(_kept(idx, ok), [1])

    def test_all_invalid_and_empty(self):
        boxes = jnp.zeros((4, 4))
        idx, ok = ops.nms(boxes, jnp.ones(4), 0.5, 6, jnp.zeros(4, bool))
        chex.assert_shape(idx, (6,))
        self.assertFalse(bool(ok.any()))
        idx, ok = ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3)
        chex.assert_shape(ok, (3,))
        self.assertFalse(bool(ok.any()))

    def test_degenerate_boxes(self):
        boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 4, 4]], np.float32)
        scores = np.array([0.5, 0.4, 0.3], np.float32)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
        idx, ok = ops.nms(boxes, scores, 0.5, 3)
        np.testing.assert_array_equal(_kept(idx, ok), ref)
