"""Pictures of predictions for people to look at.

``draw_predictions`` paints each detection kept by the score threshold as a
translucent mask (probability > ``mask_threshold``) with a solid outline, its
box, and a label ``"<class name> <score>"`` on a filled tag above the box.
Colours are per detection (distinct neighbouring hues), so touching objects of
one class stay tellable apart; the text says the class.

``run_prediction`` runs a predictor on image files and writes a picture of
each (what ``python -m maskrcnn_jax.predict`` does) together with the drawn
detections as COCO results.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskrcnn_jax import coco_eval, image_io

PREDICTIONS_FILE = "predictions.json"

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def instance_color(index: int) -> tuple[int, int, int]:
    """A saturated RGB colour for the ``index``-th detection; neighbours differ in hue."""
    hue = (0.13 + index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def label_name(label: int, class_names: Sequence[str] | None) -> str:
    """``class_names[label]``, or the number when there is no such name."""
    if class_names is not None and 0 <= label < len(class_names) and class_names[label]:
        return str(class_names[label])
    return str(label)


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = int(np.clip(min(image_size) / 32, 11, 40))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font.
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` [H, W] bool with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def draw_predictions(
    image: np.ndarray | Image.Image,
    prediction: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """Draws masks, boxes, class names and scores on a copy of ``image``.

    Args:
      image: ``[H, W, 3] uint8`` RGB array or PIL image.
      prediction: ``boxes [N, 4]`` xyxy in ``image``'s pixels, ``scores [N]``,
        ``labels [N]``, optionally ``masks [N, H, W]`` (or ``[N, 1, H, W]``)
        probabilities at ``image``'s size.
      class_names: name of each label (index = label); numbers are shown
        for labels without one.
      score_threshold: detections scoring below it are not drawn.
      mask_threshold: probability above which a mask pixel is painted.
      mask_alpha: opacity of the mask fill.

    Returns:
      A new RGB ``PIL.Image`` of ``image``'s size. Higher-scoring detections are
      drawn last, so they sit on top.
    """
    base = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    )
    width, height = base.size
    canvas = np.asarray(base, np.float32).copy()  # [H, W, 3]

    boxes = np.asarray(prediction["boxes"], np.float32).reshape(-1, 4)
    scores = np.asarray(prediction["scores"], np.float32).reshape(-1)
    labels = np.asarray(prediction["labels"]).astype(np.int64).reshape(-1)
    masks = prediction.get("masks")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape[1:] != (height, width):
            raise ValueError(f"masks {masks.shape} do not match the image ({height}, {width})")

    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]
    colors = {i: instance_color(rank) for rank, i in enumerate(order[::-1])}

    if masks is not None:
        for i in order:
            mask = masks[i] > mask_threshold  # [H, W]
            if not mask.any():
                continue
            color = np.asarray(colors[i], np.float32)
            canvas[mask] = (1.0 - mask_alpha) * canvas[mask] + mask_alpha * color
            canvas[_outline(mask)] = color

    out = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = _font((width, height))
    line = max(1, round(min(width, height) / 250))
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colors[i], width=line)
        text = f"{label_name(int(labels[i]), class_names)} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, th // 5)
        tx = min(max(x1, 0.0), max(width - tw - 2 * pad, 0))
        ty = y1 - th - 2 * pad
        if ty < 0:  # No room above the box: put the tag inside it.
            ty = max(y1, 0.0)
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colors[i])
        r, g, b = colors[i]
        ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)
    return out


@dataclasses.dataclass
class PredictionReport:
    """What :func:`run_prediction` did.

    Attributes:
      pictures: image path -> picture written.
      failed: (image path, one-line reason) of each image that could not be read.
      num_detections: detections written to ``predictions.json``.
      predictions_file: path of ``predictions.json``.
    """

    pictures: dict[str, str]
    failed: list[tuple[str, str]]
    num_detections: int
    predictions_file: str


def picture_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per image, ``<stem>_2.png``... when stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(f"{stem}.png" if count == 1 else f"{stem}_{count}.png")
    return names


def run_prediction(
    predictor: Callable[[list[np.ndarray]], list[dict[str, Any]]],
    image_paths: Sequence[str],
    output_dir: str,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    batch_size: int = 1,
    category_ids: np.ndarray | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> PredictionReport:
    """Predicts on each image; writes ``<stem>.png`` pictures and ``predictions.json``.

    Images are read upright (EXIF orientation applied). An unreadable one is
    reported to ``log`` (``"error: <reason>"``) and listed in the report's
    ``failed``; the others go on. ``predictions.json`` is COCO results with
    ``"image"`` (the path as given) in place of ``image_id``, written
    atomically.

    Args:
      predictor: maps a list of ``[H, W, 3] uint8`` images to per-image dicts
        (``boxes [N, 4]`` xyxy, ``scores``, ``labels``, ``masks [N, H, W]``).
      image_paths: files (directories are expanded by the caller, see
        ``image_io.list_images``).
      output_dir: created if missing.
      class_names: label -> name, for the pictures.
      score_threshold: detections below it are neither drawn nor written.
      batch_size: images per predictor call.
      category_ids: label -> category id for the JSON (``None``: labels as ids).
      progress: show a tqdm bar (on a terminal).
      log: receives one line per unreadable image (default: stderr).

    Returns:
      A ``PredictionReport``.

    Raises:
      ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    os.makedirs(output_dir, exist_ok=True)
    paths = list(image_paths)
    names = dict(zip(paths, picture_names(paths)))
    report = PredictionReport({}, [], 0, os.path.join(output_dir, PREDICTIONS_FILE))
    results: list[dict[str, Any]] = []

    def load(path: str) -> np.ndarray:
        return image_io.load_image(path, exif_transpose=True)

    for batch in image_io.load_batches(
        paths, load, batch_size, log=log, log_prefix="error", progress=progress
    ):
        report.failed.extend(batch.skipped)
        predictions = predictor(batch.images) if batch.images else []
        for path, image, prediction in zip(batch.items, batch.images, predictions, strict=True):
            prediction = {k: np.asarray(v) for k, v in prediction.items()}
            picture = draw_predictions(
                image, prediction, class_names, score_threshold=score_threshold
            )
            picture_path = os.path.join(output_dir, names[path])
            picture.save(picture_path)
            report.pictures[path] = picture_path
            results.extend(
                coco_eval.prediction_to_results(
                    prediction,
                    path,
                    category_ids=category_ids,
                    score_threshold=score_threshold,
                    image_key="image",
                )
            )
    tmp = report.predictions_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, report.predictions_file)
    report.num_detections = len(results)
    return report
