"""COCO box and mask AP of a checkpoint on a COCO-format annotation file.

    python -m maskrcnn_jax.evaluate (--checkpoint CKPT_DIR | --exported DIR) \\
        --annotations instances.json \\
        --images DIR [--output metrics.json] [--max_images N] [--batch_size 8] \\
        [--score_threshold 0] [--predictions results.json]

Runs the model on every image of the file (sorted by image id; the first N with
``--max_images``), prints pycocotools' 12-number tables for ``bbox`` and
``segm`` and writes, with ``--output``::

    {"bbox": {"AP": ..., "AP50": ..., ..., "ARl": ...}, "segm": {...},
     "per_class": {"<category name>": {"bbox_AP": ..., "segm_AP": ...}, ...},
     "images": <images evaluated>, "skipped": <images that could not be read>}

and prints a per-class table after them: each category's AP from pycocotools'
precision array (mean over IoU thresholds and recall points, area ``all``,
100 detections; -1, shown ``-``, for a category without ground truth).
``--exported DIR`` evaluates an artifact of ``python -m maskrcnn_jax.export``
(through ``serving.ExportedPredictor``) instead of a checkpoint.

Values are pycocotools' (fractions in [0, 1]; -1 where a size range has no
ground truth). Only the images actually run are evaluated: ``--max_images`` and
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
2 for a bad checkpoint or annotation file. The dashed flag spellings
(``--max-images`` ...) are accepted too.

The work is ``coco_eval.run_evaluation`` (which training calls as well); this
module only parses flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from maskrcnn_jax import cli_flags, coco_eval


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_flags.ArgumentParser(
        prog="python -m maskrcnn_jax.evaluate",
        description="COCO bbox and segm AP of a Mask R-CNN checkpoint.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint dir or training work dir")
    model.add_argument(
        "--exported", help="artifact dir of python -m maskrcnn_jax.export (instead of --checkpoint)"
    )
    parser.add_argument("--annotations", required=True, help="COCO-format instances JSON")
    parser.add_argument("--images", required=True, help="directory of the images' file_name")
    parser.add_argument("--output", help="write the metrics JSON here")
    parser.add_flag("--max_images", type=int, help="evaluate the first N images (by id)")
    parser.add_flag("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_flag(
        "--score_threshold",
        type=float,
        default=0.0,
        help="drop detections below it (default 0: keep what the model returns)",
    )
    parser.add_argument("--predictions", help="also write the COCO results JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max_images must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from maskrcnn_jax.checkpoint import CheckpointError

    try:
        coco_gt = coco_eval.load_coco(args.annotations)
        if not os.path.isdir(args.images):
            raise ValueError(f"{args.images}: no such image directory")
        from maskrcnn_jax.serving import load_predictor  # jax only once a model is wanted

        predictor = load_predictor(args.checkpoint, args.exported, args.batch_size)
        category_ids = coco_eval.label_to_category_id(coco_eval.model_config_of(predictor), coco_gt)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = coco_eval.run_evaluation(
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
