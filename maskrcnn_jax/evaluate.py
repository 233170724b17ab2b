"""COCO box and mask AP of a checkpoint on a COCO-format annotation file.

    python -m maskrcnn_jax.evaluate --checkpoint CKPT_DIR --annotations instances.json \\
        --images DIR [--output metrics.json] [--max-images N]

Runs the model on every image of the file (sorted by image id; the first N with
``--max-images``), prints pycocotools' 12-number tables for ``bbox`` and
``segm`` and writes, with ``--output``::

    {"bbox": {"AP": ..., "AP50": ..., ..., "ARl": ...}, "segm": {...},
     "images": <images evaluated>, "skipped": <images that could not be read>}

Values are pycocotools' (fractions in [0, 1]; -1 where a size range has no
ground truth). Only the images actually run are evaluated: ``--max-images`` and
unreadable images (reported on stderr, one line each, and counted in
``skipped``) shrink the evaluated set instead of counting as misses. An image
whose size differs from the annotation's ``height``/``width`` is skipped too.
Images are read in their stored pixel frame (no EXIF rotation), as COCO's
annotations are.

Labels become category ids by ``coco_eval.label_to_category_id``: the model
config's ``category_ids`` if present; else, for a 91-class (torchvision COCO)
model, the label itself; else label k is the k-th category of the file sorted
by id.

Exit status: 0; 1 if any image was skipped (metrics are still written);
2 for a bad checkpoint or annotation file.

``run_evaluation`` is the library entry point (training calls it with an
in-memory predictor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from pycocotools.coco import COCO

from maskrcnn_jax import coco_eval, image_io


def _log_to_stderr(message: str) -> None:
    tqdm.tqdm.write(message, file=sys.stderr)  # Keeps a progress bar intact.


def run_evaluation(
    predictor: Callable[[list[np.ndarray]], list[dict[str, Any]]],
    annotations: str | os.PathLike | Mapping[str, Any] | COCO,
    images_dir: str | os.PathLike,
    max_images: int | None = None,
    batch_size: int = 8,
    score_threshold: float = 0.0,
    category_ids: np.ndarray | None = None,
    iou_types: Sequence[str] | None = None,
    verbose: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    results_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs ``predictor`` over a COCO-format file's images and evaluates with pycocotools.

    Args:
      predictor: maps a list of ``[H, W, 3] uint8`` images to per-image dicts
        (``boxes [N, 4]`` xyxy original pixels, ``scores``, ``labels``,
        ``masks [N, H, W]`` probabilities); an ``inference.Predictor``.
      annotations: COCO ground truth (path, dict or ``COCO``).
      images_dir: directory the ``file_name`` of each image is relative to.
      max_images: evaluate the first N images by id only.
      batch_size: images per predictor call.
      score_threshold: drop detections below it (the predictor's own threshold
        applies first).
      category_ids: ``[num_classes]`` label -> category id; default from
        the predictor's ``model_config`` (see module doc).
      iou_types: default ``("bbox", "segm")``, ``("bbox",)`` if any prediction
        has no masks.
      verbose: print the 12-line table of each IoU type.
      progress: show a tqdm bar (on a terminal).
      log: receives one line per skipped image (default: stderr).
      results_file: also write the COCO results JSON there.

    Returns:
      ``{"bbox": {STAT_NAME: value}, "segm": {...}, "images": int, "skipped": int}``.

    Raises:
      ValueError: bad annotation file or label mapping.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if log is None:
        log = _log_to_stderr
    coco_gt = coco_eval.load_coco(annotations)
    if category_ids is None:
        category_ids = coco_eval.label_to_category_id(coco_eval.model_config_of(predictor), coco_gt)
    images = sorted(coco_gt.dataset["images"], key=lambda img: img["id"])
    if max_images is not None:
        images = images[: max(0, max_images)]

    results: list[dict[str, Any]] = []
    done: list[int] = []
    skipped = 0
    all_masks = True
    with tqdm.tqdm(
        total=len(images), unit="img", desc="evaluate", disable=None if progress else True
    ) as bar:
        for start in range(0, len(images), batch_size):
            batch_info, batch_images = [], []
            for info in images[start : start + batch_size]:
                path = os.path.join(os.fspath(images_dir), info["file_name"])
                try:
                    image = image_io.load_image(path, exif_transpose=False)
                    expected = (info.get("height"), info.get("width"))
                    if None not in expected and image.shape[:2] != tuple(expected):
                        raise image_io.ImageError(
                            f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the "
                            f"annotation's {expected[1]}x{expected[0]}"
                        )
                except image_io.ImageError as e:
                    skipped += 1
                    log(f"skipped: {e}")
                    continue
                batch_info.append(info)
                batch_images.append(image)
            predictions = predictor(batch_images) if batch_images else []
            for info, prediction in zip(batch_info, predictions, strict=True):
                prediction = {k: np.asarray(v) for k, v in prediction.items()}
                all_masks &= prediction.get("masks") is not None
                results.extend(
                    coco_eval.prediction_to_results(
                        prediction,
                        info["id"],
                        category_ids=category_ids,
                        score_threshold=score_threshold,
                    )
                )
                done.append(info["id"])
            bar.update(len(images[start : start + batch_size]))

    if results_file is not None:
        with open(results_file, "w") as f:
            json.dump(results, f)
    if iou_types is None:
        iou_types = coco_eval.IOU_TYPES if all_masks else ("bbox",)
    metrics: dict[str, Any] = coco_eval.evaluate_predictions(
        coco_gt, results, iou_types=iou_types, image_ids=done, verbose=verbose
    )
    metrics["images"] = len(done)
    metrics["skipped"] = skipped
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m maskrcnn_jax.evaluate",
        description="COCO bbox and segm AP of a Mask R-CNN checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or training work dir")
    parser.add_argument("--annotations", required=True, help="COCO-format instances JSON")
    parser.add_argument("--images", required=True, help="directory of the images' file_name")
    parser.add_argument("--output", help="write the metrics JSON here")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images (by id)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.0,
        help="drop detections below it (default 0: keep what the model returns)",
    )
    parser.add_argument("--predictions", help="also write the COCO results JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from maskrcnn_jax.checkpoint import CheckpointError
    from maskrcnn_jax.inference import Predictor

    try:
        coco_gt = coco_eval.load_coco(args.annotations)
        if not os.path.isdir(args.images):
            raise ValueError(f"{args.images}: no such image directory")
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size)
        category_ids = coco_eval.label_to_category_id(coco_eval.model_config_of(predictor), coco_gt)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = run_evaluation(
        predictor,
        coco_gt,
        args.images,
        max_images=args.max_images,
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        category_ids=category_ids,
        verbose=True,
        progress=True,
        results_file=args.predictions,
    )
    print(f"{metrics['images']} image(s) evaluated, {metrics['skipped']} skipped")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    return 1 if metrics["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
