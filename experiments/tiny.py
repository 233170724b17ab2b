"""A tiny model on tiny shapes images, for smoke tests of the whole training path.

Run (a few seconds of compute once compiled):
  python -m maskrcnn_jax.train --config experiments/tiny.py --workdir /tmp/tiny
"""

from __future__ import annotations

from experiments.base import get_base_config
from maskrcnn_jax.modeling import get_model_config


def get_config():
    config = get_base_config()
    config.model = get_model_config(
        num_classes=4,
        depth=18,
        backbone_width=8,
        norm="gn",
        freeze_at=0,
        fpn_channels=16,
        head_norm="gn",
        anchor_sizes=[8, 16, 32, 64, 128],
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=64,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=64,
        detections_per_img=16,
        box_candidates=128,
        representation_size=32,
        mask_head_dim=16,
        min_size=64,
        max_size=64,
        roi_align_impl="reference",
        # Two prefixes, not the default four: the tests that train this model still run the
        # mask head's switch, and each compile of its step is about 6 s shorter.
        mask_head_prefixes=2,
    )
    ds = config.dataset
    ds.image_size = (64, 64)
    ds.scales = (64,)
    ds.max_size = 64
    ds.max_instances = 8
    ds.mask_size = 28
    ds.num_workers = 0
    ds.shapes.image_size = 64
    ds.shapes.num_train = 32
    ds.shapes.num_val = 8
    ds.shapes.min_size = 12
    ds.shapes.max_size = 30
    ds.shapes.max_shapes = 3

    train = config.train
    train.steps = 4
    train.batch_size = 8
    train.base_lr = 0.01  # = 0.02 * 8 / 16, the rate at batch 8 before steps scaled
    train.reference_batch_size = 8
    train.warmup_steps = 2
    train.decay_steps = (1000,)
    config.model.rpn_batch_size_per_image = 64
    config.model.roi_batch_size_per_image = 32
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval_every = 0
    config.eval_at_end = False
    config.num_pictures = 0
    return config
