"""Prepares a dataset ahead of training, or exports shapes as COCO-format files.

Run::

    # COCO 2017 (or any COCO-format export) into ./data_cache:
    python -m maskrcnn_jax.data.prepare --name coco \
      --train_annotations /coco/annotations/instances_train2017.json \
      --train_images /coco/train2017 \
      --val_annotations /coco/annotations/instances_val2017.json \
      --val_images /coco/val2017
    # The synthetic default:
    python -m maskrcnn_jax.data.prepare --name shapes
    # shapes validation split as instances JSON + PNGs (for COCO evaluation):
    python -m maskrcnn_jax.data.prepare --export_shapes_coco /tmp/shapes_coco --split validation

Preparing an already prepared dataset does nothing. For COCO-format data the
train split's image sizes are read once more and kept beside it (the aspect-
ratio canvases of training group images by orientation). Prints the category
map and, per split, the counts and the bad items skipped.
"""

from __future__ import annotations

import argparse
import logging

from maskrcnn_jax.data.config import get_dataset_config
from maskrcnn_jax.data.input_pipeline import prepare_train_data
from maskrcnn_jax.data.shapes import write_shapes_coco


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", choices=("shapes", "coco"), default="shapes")
    parser.add_argument("--data_dir", default="")
    for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
        parser.add_argument(f"--{key}", default="")
    parser.add_argument("--skip_bad_annotations", action=argparse.BooleanOptionalAction,
                        default=None)
    parser.add_argument("--export_shapes_coco", default="", metavar="OUT_DIR")
    parser.add_argument("--split", default="validation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    config = get_dataset_config(args.name)
    if args.export_shapes_coco:
        s = config.shapes
        n = s.num_val if args.split == "validation" else s.num_train
        ann, images = write_shapes_coco(
            args.export_shapes_coco, args.split, n, s.image_size, s.seed,
            min_shapes=s.min_shapes, max_shapes=s.max_shapes, min_size=s.min_size,
            max_size=s.max_size,
        )
        print(f"wrote {ann} and {images}/")
        return
    config.data_dir = args.data_dir
    for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
        config[key] = getattr(args, key)
    if args.skip_bad_annotations is not None:
        config.skip_bad_annotations = args.skip_bad_annotations
    prepared = prepare_train_data(config)  # With the coco preset's canvases: the image sizes too.
    print(f"prepared: {prepared.builder.data_dir}")
    print("categories (label: id name): " + ", ".join(
        f"{k + 1}: {i} {n}" for k, (i, n) in
        enumerate(zip(prepared.categories.category_ids, prepared.categories.names))))
    for split, stats in prepared.split_stats.items():
        print(f"{split}: {stats['num_images']} images, {stats['num_annotations']} instances "
              f"({stats['num_crowd']} crowd); skipped: {stats.get('skipped') or 'none'}")


if __name__ == "__main__":
    main()
