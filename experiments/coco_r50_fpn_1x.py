"""Detectron2's 1x recipe for COCO 2017 on GPU / TPU: R50-FPN, 90k steps, batch 16.

Run on one GPU (batch 16 fits an 80 GB card in bfloat16). On smaller cards use
``--config.train.batch_size=8``: the schedule scales with the batch
(Detectron2's rule), so that is 180k steps at lr 0.01 with decays at 120k and
160k, the same 12 epochs. Training images without annotations are dropped
(``dataset.drop_empty_images``, the coco preset's default); the start of the
log states the schedule and the number dropped.
  python -m maskrcnn_jax.train --config experiments/coco_r50_fpn_1x.py --workdir runs/coco \
    --config.dataset.train_annotations=/data/coco/annotations/instances_train2017.json \
    --config.dataset.train_images=/data/coco/train2017 \
    --config.dataset.val_annotations=/data/coco/annotations/instances_val2017.json \
    --config.dataset.val_images=/data/coco/val2017 \
    --config.init.backbone_checkpoint=/data/resnet50-0676ba61.pth
"""

from __future__ import annotations

from experiments.base import get_base_config
from maskrcnn_jax.data import get_dataset_config
from maskrcnn_jax.modeling import get_model_config


def get_config():
    config = get_base_config()
    config.accelerator_recommended = True
    config.model = get_model_config(num_classes=81, dtype="bfloat16", roi_align_impl="auto")
    config.dataset = get_dataset_config("coco")
    config.dataset.num_workers = 8
    config.train.batch_size = 16
    config.train.steps = 90_000
    config.checkpoint_every = 2_000
    config.eval_every = 10_000
    return config
