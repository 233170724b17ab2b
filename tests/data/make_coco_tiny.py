"""Regenerates tests/data/coco_tiny: a tiny COCO-format fixture (images, GT, results).

    .venv/bin/python tests/data/make_coco_tiny.py

Four PNGs with flat-coloured circles, squares and triangles drawn from the same
polygons as the ground truth; category ids with gaps (1, 3, 7); small, medium
and large objects; one crowd region (uncompressed RLE); one image without
objects. ``results.json`` holds detections in COCO results format (bbox and
compressed-RLE segmentation): jittered copies of the ground truth with made-up
scores, some with the wrong class, duplicates and false positives.
"""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coco_tiny")
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
COLORS = {1: (220, 60, 60), 3: (60, 160, 60), 7: (60, 80, 220)}


def circle(cx, cy, r, n=20):
    return [
        c
        for k in range(n)
        for c in (cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n))
    ]


def square(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def triangle(x, y, s):
    return [x, y + s, x + s, y + s, x + s / 2, y]


# (file, width, height, [(category, polygon)])
IMAGES = [
    (
        "shapes_1.png",
        160,
        120,
        [(3, square(20, 8, 112, 96)), (1, circle(145, 20, 9)), (7, triangle(135, 70, 22))],
    ),
    (
        "shapes_2.png",
        128,
        128,
        [
            (1, circle(30, 30, 20)),
            (1, circle(90, 35, 6)),
            (7, triangle(60, 70, 50)),
            (3, square(5, 100, 20, 20)),
        ],
    ),
    ("shapes_3.png", 96, 128, [(3, square(10, 10, 40, 40)), (1, circle(70, 95, 15))]),
    ("empty.png", 48, 40, []),
]
CROWD = ("shapes_2.png", 1, (100, 90, 24, 30))  # image, category, box of a crowd region


def main():
    rng = np.random.default_rng(0)
    images, annotations, results = [], [], []
    for image_id, (name, w, h, objects) in enumerate(IMAGES, start=1):
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        picture = Image.new("RGB", (w, h), (235, 230, 215))
        draw = ImageDraw.Draw(picture)
        for cat, poly in objects:
            draw.polygon(poly, fill=COLORS[cat])
            rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [[round(v, 2) for v in poly]],
                    "area": float(mask_util.area(rle)),
                    "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            # Detections: a jittered copy, sometimes also a wrong-class duplicate.
            for k in range(1 + (rng.random() < 0.4)):
                dx, dy = rng.uniform(-3, 3, 2)
                det = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(poly)]
                drle = mask_util.merge(mask_util.frPyObjects([det], h, w))
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat
                        if k == 0
                        else next(c["id"] for c in CATEGORIES if c["id"] != cat),
                        "bbox": [round(float(v), 2) for v in mask_util.toBbox(drle)],
                        "score": round(
                            float(rng.uniform(0.3, 1.0) if k == 0 else rng.uniform(0.05, 0.6)), 4
                        ),
                        "segmentation": {"size": drle["size"], "counts": drle["counts"].decode()},
                    }
                )
        if name == CROWD[0]:
            cx, cy, cw, ch = CROWD[2]
            m = np.zeros((h, w), np.uint8)
            m[cy : cy + ch, cx : cx + cw] = 1
            draw.rectangle([cx, cy, cx + cw - 1, cy + ch - 1], fill=COLORS[CROWD[1]])
            counts, prev, run = [], 0, 0
            for v in m.flatten(order="F"):  # uncompressed RLE, as COCO stores crowds
                if v != prev:
                    counts.append(run)
                    prev, run = v, 0
                run += 1
            counts.append(run)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CROWD[1],
                    "segmentation": {"size": [h, w], "counts": counts},
                    "area": float(m.sum()),
                    "bbox": [cx, cy, cw, ch],
                    "iscrowd": 1,
                }
            )
            # A detection on the crowd (ignored, not a false positive).
            rle = mask_util.encode(np.asfortranarray(m))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": CROWD[1],
                    "bbox": [cx, cy, cw, ch],
                    "score": 0.7,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                }
            )
        picture.save(os.path.join(HERE, name), optimize=True)
    # False positives, one on the empty image.
    for image_id, (x, y, s) in ((4, (5, 5, 20)), (1, (60, 100, 15))):
        w, h = IMAGES[image_id - 1][1:3]
        m = np.zeros((h, w), np.uint8)
        m[y : y + s, x : x + s] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        results.append(
            {
                "image_id": image_id,
                "category_id": 3,
                "bbox": [x, y, s, s],
                "score": 0.55,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            }
        )
    with open(os.path.join(HERE, "instances.json"), "w") as f:
        json.dump(
            {
                "info": {"description": "maskrcnn_jax test fixture"},
                "images": images,
                "annotations": annotations,
                "categories": CATEGORIES,
            },
            f,
        )
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
