"""Validation during training: COCO AP on the validation split, and pictures.

The validation split is read in COCO format and evaluated by
``coco_eval.run_evaluation``, so that training reports exactly what
``python -m maskrcnn_jax.evaluate`` would: for ``coco`` datasets the user's
``val_annotations`` / ``val_images``; for ``shapes`` its validation split
written once as COCO JSON + PNGs under ``WORKDIR/shapes_val``. The model runs
through an ``inference.Predictor`` (its own ``min_size`` / ``max_size``
resize, one image per device call), as for any checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from maskrcnn_jax import coco_eval, visualize
from maskrcnn_jax.class_names import default_class_names
from maskrcnn_jax.data import write_shapes_coco
from maskrcnn_jax.image_io import load_image
from maskrcnn_jax.inference import Predictor

SUMMARY = ("AP", "AP50", "AP75")


def validation_set(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(annotations json, images dir) of the validation split in COCO format."""
    ds = config.dataset
    if ds.name == "coco":
        return ds.val_annotations, ds.val_images
    out = os.path.join(workdir, "shapes_val")
    ann = os.path.join(out, "annotations", "instances_validation.json")
    if os.path.exists(ann):
        return ann, os.path.join(out, "validation")
    s = ds.shapes
    return write_shapes_coco(
        out, "validation", s.num_val, s.image_size, s.seed, min_shapes=s.min_shapes,
        max_shapes=s.max_shapes, min_size=s.min_size, max_size=s.max_size,
    )  # fmt: skip


def evaluate_during_training(
    config: ml_collections.ConfigDict,
    variables: Any,
    model_config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    pictures: int = 0,
) -> dict[str, float]:
    """COCO bbox and segm metrics as flat ``{"bbox_AP": ..., "segm_AP": ...}``.

    Per-category AP comes as ``per_class/<name>/bbox_AP`` and ``.../segm_AP``
    (``-1`` for a category without ground truth), so it reaches the metrics
    writer and TensorBoard beside the totals.

    With ``pictures > 0`` the first validation images are also drawn with
    their predictions into ``WORKDIR/pictures/``.
    """
    predictor = Predictor(variables, model_config)
    ann, images_dir = validation_set(config, workdir)
    metrics = coco_eval.run_evaluation(
        predictor, ann, images_dir, max_images=config.eval_max_images or None, verbose=False
    )
    flat = {f"{t}_{k}": float(v) for t in ("bbox", "segm") for k, v in metrics.get(t, {}).items()}
    for name, aps in metrics.get("per_class", {}).items():
        flat.update({f"per_class/{name}/{k}": float(v) for k, v in aps.items()})
    flat["eval_images"] = metrics["images"]
    summary = [
        f"{k}={flat[k]:.3f}" for k in flat if "/" not in k and k.split("_", 1)[-1] in SUMMARY
    ]
    logging.info("step %d: %s", step, ", ".join(summary))
    if pictures:
        draw_pictures(predictor, ann, images_dir, os.path.join(workdir, "pictures"), pictures)
    return flat


def draw_pictures(
    predictor: Predictor, annotations: str, images_dir: str, out_dir: str, count: int
) -> list[str]:
    """Draws the predictions on the first ``count`` images (by id) of ``annotations``.

    Returns:
      The paths of the pictures written, ``out_dir/<stem>.png``; images
      smaller than 512 pixels are drawn enlarged by an integer factor.
    """
    with open(annotations) as f:
        images = sorted(json.load(f)["images"], key=lambda im: im["id"])[:count]
    os.makedirs(out_dir, exist_ok=True)
    names = default_class_names(coco_eval.model_config_of(predictor))
    written = []
    arrays = [load_image(os.path.join(images_dir, im["file_name"])) for im in images]
    for im, array, pred in zip(images, arrays, predictor(arrays)):
        stem = os.path.splitext(os.path.basename(im["file_name"]))[0]
        path = os.path.join(out_dir, stem + ".png")
        # Shapes images are small: draw at 4x so that labels are legible.
        scale = max(1, 512 // max(array.shape[:2]))
        if scale > 1:
            array, pred = _upscale(array, pred, scale)
        visualize.draw_predictions(array, pred, names, score_threshold=0.5).save(path)
        written.append(path)
    return written


def _upscale(image: np.ndarray, pred: dict, scale: int):
    image = np.repeat(np.repeat(image, scale, 0), scale, 1)
    pred = dict(pred)
    pred["boxes"] = np.asarray(pred["boxes"]) * scale
    pred["masks"] = np.repeat(np.repeat(np.asarray(pred["masks"]), scale, 1), scale, 2)
    return image, pred
