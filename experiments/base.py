"""Fields shared by every experiment; experiments import and override them."""

from __future__ import annotations

import ml_collections

from maskrcnn_jax.data import get_dataset_config
from maskrcnn_jax.modeling import get_model_config


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # True for configs meant for a GPU / TPU: the trainer warns when it finds only a CPU.
    config.accelerator_recommended = False
    config.model = get_model_config()
    config.dataset = get_dataset_config("shapes")

    train = config.train = ml_collections.ConfigDict()
    train.steps = 90_000
    train.batch_size = 16  # global, over all devices and hosts
    train.num_devices = 0  # 0 = all devices
    # Detectron2's 1x recipe: lr 0.02 at batch 16, scaled linearly with the batch.
    # Steps, warm-up and decays below are counted at reference_batch_size images
    # per step, and base_lr is the rate at that batch; another train.batch_size
    # rescales all of them (Detectron2's rule, see optim.effective_schedule).
    train.base_lr = 0.02
    train.reference_batch_size = 16
    train.warmup_steps = 1000
    train.warmup_factor = 0.001
    train.decay_steps = (60_000, 80_000)
    train.decay_factor = 0.1
    train.momentum = 0.9
    train.weight_decay = 1e-4
    train.decay_norm_and_bias = False
    train.clip_norm = 0.0  # 0 = no clipping
    train.max_bad_steps = 10  # stop after this many consecutive non-finite steps (seen a step late)

    init = config.init = ml_collections.ConfigDict()
    init.checkpoint = ""  # a Mask R-CNN checkpoint to fine-tune (class layers re-initialised)
    init.backbone_checkpoint = ""  # a torchvision ResNet classification .pth (ImageNet)
    # A frozen-norm backbone with neither checkpoint is refused at start-up
    # (its frozen stages would stay random); True trains it from scratch anyway.
    init.from_scratch = False

    config.log_every = 20
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.eval_every = 10_000  # 0 = no periodic evaluation
    config.eval_at_end = True
    config.eval_max_images = 0  # 0 = the whole validation split
    config.num_pictures = 4  # prediction pictures written at the end
    return config
