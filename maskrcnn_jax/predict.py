"""Run a checkpoint on image files; write pictures and COCO-format predictions.

    python -m maskrcnn_jax.predict --checkpoint CKPT_DIR --output-dir OUT IMAGE [IMAGE ...]

For each image ``OUT/<stem>.png`` shows the detections scoring at least
``--score-threshold`` (masks at probability 0.5, boxes, class names, scores);
``OUT/predictions.json`` lists the same detections in COCO results format, with
``"image"`` (the path as given) in place of ``image_id``::

    [{"image": "photos/cat.jpg", "category_id": 17, "bbox": [x, y, w, h],
      "score": 0.98, "segmentation": {"size": [H, W], "counts": "..."}}, ...]

``category_id`` is the model's label mapped as for evaluation
(``coco_eval.label_to_category_id``: the config's ``category_ids``, else the
label itself). A directory among the inputs stands for the images in it.
Images are read upright (EXIF orientation applied), so boxes are in the upright
frame. A file that cannot be read is reported on stderr (one line) and skipped;
the exit status is then 1. Bad flags, checkpoints or class-name files: status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

from maskrcnn_jax import coco_eval, image_io, visualize
from maskrcnn_jax.coco_names import NUM_TORCHVISION_COCO_CLASSES, TORCHVISION_COCO_CLASS_NAMES

PREDICTIONS_FILE = "predictions.json"


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


def _category_table(model_config: Any) -> np.ndarray | None:
    """Label -> category id when the config knows it (or for COCO); else labels as they are."""
    try:
        return coco_eval.label_to_category_id(model_config)
    except ValueError:
        return None


@dataclasses.dataclass
class PredictionReport:
    """What ``run_prediction`` did.

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


def _picture_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per image, ``<stem>_2.png``... when stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(f"{stem}.png" if count == 1 else f"{stem}_{count}.png")
    return names


def _log_to_stderr(message: str) -> None:
    tqdm.tqdm.write(message, file=sys.stderr)  # Keeps a progress bar intact.


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
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if log is None:
        log = _log_to_stderr
    os.makedirs(output_dir, exist_ok=True)
    paths = list(image_paths)
    picture_names = dict(zip(paths, _picture_names(paths)))
    report = PredictionReport({}, [], 0, os.path.join(output_dir, PREDICTIONS_FILE))
    results: list[dict[str, Any]] = []
    with tqdm.tqdm(total=len(paths), unit="img", disable=None if progress else True) as bar:
        for start in range(0, len(paths), batch_size):
            batch_paths, images = [], []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(image_io.load_image(path, exif_transpose=True))
                    batch_paths.append(path)
                except image_io.ImageError as e:
                    report.failed.append((path, str(e)))
                    log(f"error: {e}")
            predictions = predictor(images) if images else []
            for path, image, prediction in zip(batch_paths, images, predictions, strict=True):
                prediction = {k: np.asarray(v) for k, v in prediction.items()}
                picture = visualize.draw_predictions(
                    image, prediction, class_names, score_threshold=score_threshold
                )
                picture_path = os.path.join(output_dir, picture_names[path])
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
            bar.update(len(paths[start : start + batch_size]))
    tmp = report.predictions_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, report.predictions_file)
    report.num_detections = len(results)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m maskrcnn_jax.predict",
        description="Draw Mask R-CNN predictions on images and write them as COCO results.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or training work dir")
    parser.add_argument("--output-dir", required=True, help="where pictures and JSON go")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="detections below it are neither drawn nor written (default 0.5)",
    )
    parser.add_argument(
        "--class-names",
        help="text file, one class name per line for labels 1..K (default: the checkpoint's, "
        "or COCO's for a 91-class torchvision checkpoint)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from maskrcnn_jax.checkpoint import CheckpointError
    from maskrcnn_jax.inference import Predictor

    paths = image_io.list_images(args.images)
    if not paths:
        print(f"error: no images in {' '.join(args.images)}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
        config = coco_eval.model_config_of(predictor)
        if args.class_names:
            class_names = read_class_names(
                args.class_names, int(coco_eval.config_get(config, "num_classes"))
            )
        else:
            class_names = default_class_names(config)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_prediction(
        predictor,
        paths,
        args.output_dir,
        class_names=class_names,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        category_ids=_category_table(config),
        progress=True,
    )
    ok = len(report.pictures)
    print(
        f"{ok} image(s), {report.num_detections} detection(s) -> {args.output_dir}"
        + (f"; {len(report.failed)} image(s) failed" if report.failed else "")
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
