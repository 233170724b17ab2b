"""Anchors: hand-computed values and torchvision's AnchorGenerator order.

Anchors are whole pixels (cell anchors rounded, integer shifts), so both
sides produce the same small integers in float32 and compare exactly.
"""

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn_jax import ops


def test_tiny_image_by_hand():
    anchors = np.asarray(
        ops.generate_anchors((64, 64), strides=(32,), sizes=((32,),), aspect_ratios=(0.5, 1.0))
    )
    # ratio 0.5: w = 32*sqrt(2) = 45.25 -> half 22.63 -> 23; h = 32/sqrt(2) -> half 11.31 -> 11
    expected = []
    for y in (0, 32):
        for x in (0, 32):
            expected += [[x - 23, y - 11, x + 23, y + 11], [x - 16, y - 16, x + 16, y + 16]]
    np.testing.assert_array_equal(anchors, np.array(expected, np.float32))


def _torchvision_anchors(image_size):
    # torchvision's Mask R-CNN: five levels at strides 4..64, one size each.
    gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    feats = [
        torch.zeros(1, 1, -(-image_size[0] // s), -(-image_size[1] // s))
        for s in (4, 8, 16, 32, 64)
    ]
    return gen(images, feats)[0].numpy()


# 800 rows: P5 has 25 rows, P6 13, so P6's row step is 800 // 13 = 61, not 64.
@pytest.mark.parametrize("size", [(800, 1088), (96, 128)])
def test_matches_torchvision_all_levels(size):
    ours = np.asarray(ops.generate_anchors(size))  # defaults: FPN_STRIDES
    ref = _torchvision_anchors(size)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert sum(ops.num_anchors_per_level(size)) == ref.shape[0]


def test_fpn_strides_are_torchvisions_and_the_defaults():
    assert ops.FPN_STRIDES == (4, 8, 16, 32, 64)  # P2..P6
    assert ops.anchors.DEFAULT_STRIDES is ops.FPN_STRIDES
    size = (96, 128)
    counts = [(96 // s) * (128 // s) * 3 for s in (4, 8, 16, 32)] + [2 * 2 * 3]  # P6 rounds up
    assert ops.num_anchors_per_level(size) == counts
