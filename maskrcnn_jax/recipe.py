"""Start-up checks of a training recipe: mistakes that would waste a run, caught in one line.

:func:`validate_recipe` runs before any data preparation or compilation (the
trainer calls it first). Each mistake raises a one-line ``ValueError`` that
names the settings involved:

- a frozen-norm backbone with nothing to initialise it from (the frozen
  stages would stay at random values for the whole run);
- a global batch that the devices cannot split evenly;
- a canvas (``dataset.image_size`` or ``dataset.aspect_canvases``) that
  cannot hold a resized image, or whose sides are not multiples of 32;
- settings spelled at their old place (``config.train`` -> ``config.model``);
- invalid model settings and schedules.
"""

from __future__ import annotations

import ml_collections

from maskrcnn_jax import optim
from maskrcnn_jax.data.transforms import InputSpec
from maskrcnn_jax.modeling.config import validate_config
from maskrcnn_jax.modeling.mask_rcnn import INPUT_MULTIPLE

# Settings that moved from config.train to config.model (the model's training forward).
MOVED_TO_MODEL = (
    "rpn_batch_size_per_image",
    "rpn_positive_fraction",
    "roi_batch_size_per_image",
    "roi_positive_fraction",
    "mask_rois_per_image",
    "smooth_l1_beta",
)


def validate_recipe(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises a one-line ``ValueError`` for the first recipe mistake in ``config``.

    Reads nothing from disk and builds nothing, so it runs in milliseconds
    before data preparation.

    Args:
      config: the experiment config (``model``, ``dataset``, ``train``, ``init``).
      num_devices: devices the global batch is split over (the mesh size).

    Raises:
      ValueError: naming the settings at fault.
    """
    for name in MOVED_TO_MODEL:
        if name in config.train:
            raise ValueError(f"config.train.{name} is now config.model.{name}")
    validate_config(config.model)
    check_initialisation(config)
    batch = int(config.train.batch_size)
    if batch < 1 or batch % num_devices:
        raise ValueError(
            f"train.batch_size={batch} is not divisible by the {num_devices} devices; use a "
            f"multiple of {num_devices} (or train.num_devices to use fewer devices)"
        )
    check_canvases(config.dataset)
    schedule = optim.effective_schedule(config.train)
    if schedule.steps < 1:
        raise ValueError(
            f"train.steps={config.train.steps} scaled by train.reference_batch_size / "
            f"train.batch_size = {schedule.scale:g} leaves no step"
        )


def check_canvases(dataset: ml_collections.ConfigDict) -> None:
    """Refuses a training canvas that cannot hold a resized image or that the model cannot take.

    ``dataset.image_size`` (or each of ``dataset.aspect_canvases``) must hold
    the largest resized image of its orientation (``InputSpec`` checks it), and
    its sides must be multiples of the model's P5 stride (32).

    Args:
      dataset: the dataset config.

    Raises:
      ValueError: one line naming the canvas setting and its value.
    """
    spec = InputSpec.from_config(dataset)
    field = "dataset.aspect_canvases" if spec.aspect_canvases else "dataset.image_size"
    for canvas in spec.canvases:
        if canvas[0] % INPUT_MULTIPLE or canvas[1] % INPUT_MULTIPLE:
            raise ValueError(
                f"{field} canvas {canvas}: sides must be multiples of {INPUT_MULTIPLE} (the "
                "model's P5 stride); round them up"
            )


def check_initialisation(config: ml_collections.ConfigDict) -> None:
    """Refuses a frozen-norm backbone with no weights to load.

    ``norm='frozen_bn'`` keeps the backbone's normalisation statistics fixed
    and (with ``freeze_at``) its first stages too: from random weights with
    identity statistics such a run can never learn. It needs
    ``init.backbone_checkpoint`` or ``init.checkpoint``; ``init.from_scratch``
    says that training it from random weights is meant.

    Args:
      config: the experiment config (``model.norm`` and ``init``).

    Raises:
      ValueError: one line naming both settings and the GroupNorm alternative.
    """
    init = config.init
    if config.model.norm != "frozen_bn" or init.checkpoint or init.backbone_checkpoint:
        return
    if init.get("from_scratch", False):
        return
    raise ValueError(
        "model.norm='frozen_bn' with neither init.backbone_checkpoint (a torchvision ResNet "
        ".pth) nor init.checkpoint (a Mask R-CNN checkpoint) set: the frozen backbone would "
        "stay random; set one of them, use model.norm='gn' (GroupNorm, trainable from "
        "scratch), or set init.from_scratch=True to train it from random weights anyway"
    )
