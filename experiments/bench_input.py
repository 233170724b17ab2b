"""Input pipeline throughput at the COCO training resolution, by worker count.

Run (from the repository root):
  .venv/bin/python -m experiments.bench_input [--images 64] [--batches 40] [--workers 0 1 2]

Makes a COCO-sized stand-in once (shapes drawn at 640x640, cropped to 640x480,
4-10 instances each, saved as JPEG with a COCO-format JSON), prepares it with
the COCO builder, then times ``make_train_iterator`` at the Detectron2
training resolution (shorter side 640..800, longer side <= 1333, padded to
the preset's landscape canvas 800x1344, or to one 1344x1344 canvas, 100
instance slots, 56x56 box-cropped masks), and with large-scale jitter to
1024x1024. The first batches (worker start-up) are not timed. Prints images
per second.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from maskrcnn_jax import data
from maskrcnn_jax.data import masks, shapes


def write_coco_sized_dataset(root: str, num_images: int, seed: int = 0) -> tuple[str, str]:
    """COCO-format JSON + JPEG folder of 640x480 shapes images (idempotent)."""
    ann_path = os.path.join(root, "instances_bench.json")
    img_dir = os.path.join(root, "images")
    if os.path.exists(ann_path):
        return ann_path, img_dir
    os.makedirs(img_dir, exist_ok=True)
    spec = shapes.ShapesSpec(image_size=640, min_shapes=4, max_shapes=10, min_size=24,
                             max_size=320)
    images, anns = [], []
    for i in range(num_images):
        image, visible, labels = shapes.generate_shapes_image(
            np.random.default_rng([seed, i]), spec)
        image, visible = image[:480], visible[:, :480]
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(img_dir, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
        for m, label in zip(visible, labels):
            if not m.any():
                continue
            rle = masks.encode_mask(m)
            area, (x0, y0, x1, y1) = masks.rle_area_and_box(rle, 480, 640)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label),
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": area, "iscrowd": 0,
                         "segmentation": masks.rle_to_coco_json(rle, 480, 640)})
    cats = [{"id": k, "name": n} for k, n in zip((1, 2, 3), shapes.SHAPE_NAMES)]
    with open(ann_path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return ann_path, img_dir


def bench(cfg, batches: int, batch_size: int, warmup: int = 3) -> float:
    """Images per second of the train iterator after ``warmup`` batches."""
    with data.make_train_iterator(cfg, seed=0, batch_size=batch_size) as it:
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        dt = time.perf_counter() - t0
    return batches * batch["image"].shape[0] / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_input"))
    args = parser.parse_args()

    ann, imgs = write_coco_sized_dataset(args.workdir, args.images)
    cfg = data.get_dataset_config("coco")
    cfg.data_dir = os.path.join(args.workdir, "prepared")
    cfg.train_annotations, cfg.train_images = ann, imgs
    prepared = data.prepare_dataset(cfg)
    stats = prepared.split_stats["train"]
    print(f"dataset: {stats['num_images']} images 640x480, "
          f"{stats['num_annotations'] / stats['num_images']:.1f} instances/image; "
          f"{os.cpu_count()} CPUs; batch {args.batch_size}")

    rows = []
    for mode in ("resize", "resize", "lsj"):
        c = cfg.copy_and_resolve_references()
        if rows and mode == "resize":
            c.aspect_canvases = ()  # One 1344x1344 canvas.
        if mode == "lsj":
            c.aspect_canvases = ()
            c.lsj.enabled = True
            c.image_size = (1024, 1024)
        canvas = tuple(c.aspect_canvases[0]) if c.aspect_canvases else tuple(c.image_size)
        for workers in args.workers:
            c.num_workers = workers
            ips = bench(c, args.batches, args.batch_size)
            rows.append((mode, canvas, workers, ips))

    print(f"\n{'transform':<10} {'padded':>11} {'workers':>8} {'images/s':>9}")
    for mode, size, workers, ips in rows:
        print(f"{mode:<10} {size[0]:>5}x{size[1]:<5} {workers:>8} {ips:>9.1f}")


if __name__ == "__main__":
    main()
