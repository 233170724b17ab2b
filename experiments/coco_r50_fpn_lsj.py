"""Large-scale jitter on COCO, after Detectron2's new baselines (R50-FPN, 100 epochs).

Detectron2's ``configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py``: a
1024x1024 canvas, each image resized to fit it times a random factor in
[0.1, 2.0] then randomly cropped / padded to it, horizontal flips; trained
from scratch (no ImageNet weights, every stage trainable) for 184,375 steps
at batch 64 (100 epochs), lr 0.1 with a 500-step warm-up from 0.067x,
x0.1 at steps 163,889 and 177,546, weight decay 4e-5, mixed precision.

What differs, because this model does not support it:

- **GroupNorm instead of SyncBN** (32 groups) in the backbone, FPN, RPN
  conv and mask head: the model has no cross-device batch norm. GroupNorm
  is independent of the batch, so the recipe also holds on one device.
- **Box head**: torchvision's two FC layers (1024), not Detectron2's four
  normalised convs + one FC (``4conv1fc``); **RPN head**: one conv, not two.
- Biases and norm scales get no weight decay (Detectron2 decays biases).

Steps scale with the batch (``train.reference_batch_size = 64``): at
``--config.train.batch_size=16`` the run takes 737,500 steps at lr 0.025.

Run (the four dataset paths as in ``coco_r50_fpn_1x.py``):
  python -m maskrcnn_jax.train --config experiments/coco_r50_fpn_lsj.py --workdir runs/lsj \
    --config.dataset.train_annotations=/data/coco/annotations/instances_train2017.json \
    --config.dataset.train_images=/data/coco/train2017 \
    --config.dataset.val_annotations=/data/coco/annotations/instances_val2017.json \
    --config.dataset.val_images=/data/coco/val2017 --config.train.batch_size=16
"""

from __future__ import annotations

from experiments.base import get_base_config
from maskrcnn_jax.data import get_dataset_config
from maskrcnn_jax.modeling import get_model_config


def get_config():
    config = get_base_config()
    config.model = get_model_config(
        num_classes=81,
        norm="gn",
        head_norm="gn",
        freeze_at=0,
        dtype="bfloat16",
        roi_align_impl="auto",
    )
    ds = config.dataset = get_dataset_config("coco")
    ds.image_size = (1024, 1024)
    ds.aspect_canvases = ()  # LSJ crops every image to the one square canvas
    ds.lsj.enabled = True
    ds.lsj.min_scale = 0.1
    ds.lsj.max_scale = 2.0
    ds.num_workers = 8
    config.init.from_scratch = True  # as Detectron2 (GroupNorm cannot take ImageNet BN weights)

    train = config.train
    train.batch_size = 64
    train.reference_batch_size = 64
    train.steps = 184_375  # 100 epochs of COCO 2017 train at batch 64
    train.base_lr = 0.1
    train.warmup_steps = 500
    train.warmup_factor = 0.067
    train.decay_steps = (163_889, 177_546)
    train.weight_decay = 4e-5
    config.checkpoint_every = 2_000
    config.eval_every = 20_000
    return config
