"""``shapes``: a procedurally drawn instance-segmentation dataset.

Each image has a random two-colour gradient background with noise and 1-4
(configurable) circles, squares and triangles of random size, colour and
position, drawn in order so later shapes occlude earlier ones. The stored mask
of an instance is its visible part, and its box is that mask's tight box. A
placement that would leave an earlier shape less than half visible is redrawn,
so every instance stays recognisable. Everything is a function of
``(seed, split, index)``: no download, identical on every machine.

Labels: 1 circle, 2 square, 3 triangle (category ids equal to the labels).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn_jax.data import features, images, masks
from maskrcnn_jax.data.categories import CategoryMap

SHAPE_NAMES = ("circle", "square", "triangle")
SHAPES_CATEGORIES = CategoryMap((1, 2, 3), SHAPE_NAMES)
SPLITS = ("train", "validation")

_MIN_VISIBLE_FRACTION = 0.5  # of an occluded shape's own area
_MIN_VISIBLE_PIXELS = 40
_PLACEMENT_TRIES = 20


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """What the generated images look like.

    Attributes:
      image_size: side of the square images.
      min_shapes: fewest shapes per image (>= 1).
      max_shapes: most shapes per image.
      min_size: smallest shape extent in pixels.
      max_size: largest shape extent in pixels (<= image_size).
    """

    image_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 4
    min_size: int = 16
    max_size: int = 56

    def __post_init__(self):
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {self}")
        if not 4 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError(f"need 4 <= min_size <= max_size <= image_size, got {self}")


def generate_shapes_image(
    rng: np.random.Generator, spec: ShapesSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws one image.

    Args:
      rng: the image's random generator.
      spec: sizes and counts.

    Returns:
      image: [S, S, 3] uint8 RGB.
      visible: [N, S, S] bool, the visible mask of each instance (N >= 1).
      labels: [N] int32 in 1..3.
    """
    s = spec.image_size
    image = _background(rng, s)
    full_masks: list[np.ndarray] = []
    labels: list[int] = []
    bg_mean = image.reshape(-1, 3).mean(0)
    for _ in range(int(rng.integers(spec.min_shapes, spec.max_shapes + 1))):
        for _ in range(_PLACEMENT_TRIES):
            label = int(rng.integers(1, 4))
            mask = _shape_mask(rng, label, s, spec)
            if _keeps_others_visible(mask, full_masks):
                break
        else:
            continue
        colour = _contrasting_colour(rng, bg_mean)
        image[mask] = colour
        full_masks.append(mask)
        labels.append(label)
    noise = rng.normal(0.0, 6.0, size=image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    visible = np.stack(full_masks)  # [N, S, S]
    for i in range(len(full_masks) - 1):
        visible[i] &= ~np.any(visible[i + 1 :], axis=0)
    return image, visible, np.asarray(labels, np.int32)


def generate_shapes_examples(
    split: str, num_images: int, spec: ShapesSpec, seed: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(image_id, stored example)`` for image ids 1..num_images.

    Args:
      split: ``'train'`` or ``'validation'`` (they use disjoint random streams).
      num_images: how many images.
      spec: image spec.
      seed: dataset seed.
    """
    for image_id, image, visible, labels in _generate(split, num_images, spec, seed):
        rles, boxes, areas = [], [], []
        for m in visible:
            rle = masks.encode_mask(m)
            area, box = masks.rle_area_and_box(rle, *m.shape)
            rles.append(rle)
            boxes.append(box)
            areas.append(area)
        n = len(labels)
        yield image_id, features.make_example(
            images.encode_png(image), image_id, f"{image_id:06d}.png", image.shape[0],
            image.shape[1], ids=[image_id * 100 + k for k in range(n)], boxes=np.asarray(boxes),
            labels=labels, is_crowd=[False] * n, areas=areas, masks=rles,
        )


def write_shapes_coco(
    out_dir: str,
    split: str,
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    **spec_kwargs: int,
) -> tuple[str, str]:
    """Writes a shapes split as a COCO-format JSON and a folder of PNGs.

    The images and annotations are exactly those of the ``shapes`` builder
    with the same seed and spec. Masks are written as compressed RLE.

    Args:
      out_dir: output folder.
      split: ``'train'`` or ``'validation'``.
      num_images: number of images.
      image_size: image side.
      seed: dataset seed.
      **spec_kwargs: other ``ShapesSpec`` fields (min_shapes, ..., max_size).

    Returns:
      (annotations_json_path, images_dir): ``out_dir/annotations/instances_<split>.json``
      and ``out_dir/<split>/``.
    """
    spec = ShapesSpec(image_size=image_size, **spec_kwargs)
    images_dir = os.path.join(out_dir, split)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    coco_images, coco_anns = [], []
    for image_id, example in generate_shapes_examples(split, num_images, spec, seed):
        with open(os.path.join(images_dir, example["file_name"]), "wb") as f:
            f.write(example["image"])
        h, w = example["height"], example["width"]
        coco_images.append({"id": image_id, "file_name": example["file_name"], "height": h,
                            "width": w})
        obj = example["objects"]
        for k in range(len(obj["id"])):
            x0, y0, x1, y1 = (float(v) for v in obj["bbox"][k])
            coco_anns.append({
                "id": int(obj["id"][k]),
                "image_id": image_id,
                "category_id": int(SHAPES_CATEGORIES.category_id_of(int(obj["label"][k]))),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(obj["area"][k]),
                "iscrowd": 0,
                "segmentation": masks.rle_to_coco_json(obj["mask"][k], h, w),
            })
    ann_path = os.path.join(ann_dir, f"instances_{split}.json")
    categories = [{"id": i, "name": n, "supercategory": "shape"}
                  for i, n in zip(SHAPES_CATEGORIES.category_ids, SHAPES_CATEGORIES.names)]
    with open(ann_path, "w") as f:
        json.dump({"images": coco_images, "annotations": coco_anns, "categories": categories}, f)
    return ann_path, images_dir


def _generate(
    split: str, num_images: int, spec: ShapesSpec, seed: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        yield (index + 1, *generate_shapes_image(rng, spec))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] uint8: a linear gradient between two random colours."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)
    return (c0 + (c1 - c0) * t[..., None]).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - bg_mean).sum() > 120:
            break
    return colour.astype(np.uint8)


def _shape_mask(rng: np.random.Generator, label: int, s: int, spec: ShapesSpec) -> np.ndarray:
    """[s, s] bool mask of one shape of class ``label``, fully inside the image."""
    size = int(rng.integers(spec.min_size, spec.max_size + 1))
    x0 = int(rng.integers(0, s - size + 1))
    y0 = int(rng.integers(0, s - size + 1))
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if SHAPE_NAMES[label - 1] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif SHAPE_NAMES[label - 1] == "square":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _keeps_others_visible(new: np.ndarray, earlier: list[np.ndarray]) -> bool:
    """Whether every earlier shape stays at least half visible on top of ``new``."""
    if not earlier:
        return True
    covered = new.copy()
    for i in range(len(earlier) - 1, -1, -1):  # From the top down.
        area = earlier[i].sum()
        visible = (earlier[i] & ~covered).sum()
        if visible < max(_MIN_VISIBLE_FRACTION * area, _MIN_VISIBLE_PIXELS):
            return False
        covered |= earlier[i]
    return True
