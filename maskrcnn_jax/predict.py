"""Run a checkpoint on image files; write pictures and COCO-format predictions.

    python -m maskrcnn_jax.predict (--checkpoint CKPT_DIR | --exported DIR) --output_dir OUT \\
        IMAGE [IMAGE ...]
        [--score_threshold 0.5] [--class_names names.txt] [--batch_size 1]

For each image ``OUT/<stem>.png`` shows the detections scoring at least
``--score_threshold`` (masks at probability 0.5, boxes, class names, scores);
``OUT/predictions.json`` lists the same detections in COCO results format, with
``"image"`` (the path as given) in place of ``image_id``::

    [{"image": "photos/cat.jpg", "category_id": 17, "bbox": [x, y, w, h],
      "score": 0.98, "segmentation": {"size": [H, W], "counts": "..."}}, ...]

``category_id`` is the model's label mapped as for evaluation
(``coco_eval.label_to_category_id``: the config's ``category_ids``, else the
label itself). ``--exported DIR`` runs an artifact of ``python -m
maskrcnn_jax.export`` instead of a checkpoint. A directory among the inputs
stands for the images in it.
Images are read upright (EXIF orientation applied), so boxes are in the upright
frame. A file that cannot be read is reported on stderr (one line) and skipped;
the exit status is then 1. Bad flags, checkpoints or class-name files: status 2.
The dashed flag spellings (``--output-dir`` ...) are accepted too.

The work is ``visualize.run_prediction``; this module only parses flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from maskrcnn_jax import class_names, cli_flags, coco_eval, image_io, visualize


def _category_table(model_config: Any) -> np.ndarray | None:
    """Label -> category id when the config knows it (or for COCO); else labels as they are."""
    try:
        return coco_eval.label_to_category_id(model_config)
    except ValueError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_flags.ArgumentParser(
        prog="python -m maskrcnn_jax.predict",
        description="Draw Mask R-CNN predictions on images and write them as COCO results.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint dir or training work dir")
    model.add_argument(
        "--exported", help="artifact dir of python -m maskrcnn_jax.export (instead of --checkpoint)"
    )
    parser.add_flag("--output_dir", required=True, help="where pictures and JSON go")
    parser.add_flag(
        "--score_threshold",
        type=float,
        default=0.5,
        help="detections below it are neither drawn nor written (default 0.5)",
    )
    parser.add_flag(
        "--class_names",
        help="text file, one class name per line for labels 1..K (default: the checkpoint's, "
        "or COCO's for a 91-class torchvision checkpoint)",
    )
    parser.add_flag("--batch_size", type=int, default=1, help="images per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from maskrcnn_jax.checkpoint import CheckpointError

    paths = image_io.list_images(args.images)
    if not paths:
        print(f"error: no images in {' '.join(args.images)}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        from maskrcnn_jax.serving import load_predictor  # jax only once a model is wanted

        predictor = load_predictor(args.checkpoint, args.exported, args.batch_size)
        config = coco_eval.model_config_of(predictor)
        if args.class_names:
            names = class_names.read_class_names(
                args.class_names, int(coco_eval.config_get(config, "num_classes"))
            )
        else:
            names = class_names.default_class_names(config)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = visualize.run_prediction(
        predictor,
        paths,
        args.output_dir,
        class_names=names,
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
