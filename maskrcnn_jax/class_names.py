"""Class names for a model's labels: from its config, COCO's, or a text file.

Used to label the pictures of predictions (``predict``, and the pictures drawn
during training). Names are indexed by label, ``names[0]`` being the
background.
"""

from __future__ import annotations

from typing import Any

from maskrcnn_jax import coco_eval
from maskrcnn_jax.coco_names import NUM_TORCHVISION_COCO_CLASSES, TORCHVISION_COCO_CLASS_NAMES


def read_class_names(path: str, num_classes: int) -> list[str]:
    """Class names from a text file, one per line, indexed by label.

    A file of ``num_classes - 1`` lines names labels ``1..K`` (background
    implied); one of ``num_classes`` lines starts with the background's name.
    Blank lines at the end are ignored.

    Raises:
      ValueError: naming the file when it is unreadable or has the wrong count.
    """
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read class names ({e.__class__.__name__})") from None
    if len(names) == num_classes - 1:
        return ["__background__"] + names
    if len(names) == num_classes:
        return names
    raise ValueError(
        f"{path}: {len(names)} class names for a model with num_classes={num_classes} "
        f"(expected {num_classes - 1}, one per line, or {num_classes} with background first)"
    )


def default_class_names(model_config: Any) -> list[str] | None:
    """The config's ``class_names`` (by label), COCO's for a 91-class model, else ``None``."""
    num_classes = int(coco_eval.config_get(model_config, "num_classes"))
    names = coco_eval.config_get(model_config, "class_names")
    if names is not None:
        names = coco_eval.by_label(names, num_classes, "class_names")
        return ["__background__" if n is None else str(n) for n in names]
    if num_classes == NUM_TORCHVISION_COCO_CLASSES:
        return list(TORCHVISION_COCO_CLASS_NAMES)
    return None
