"""Reads and checks a COCO-format instances JSON plus its image folder.

Turns one split (``instances_*.json`` + image folder) into stored examples
(see ``features.py``). Every bad image or annotation either raises
:class:`DatasetError` naming the JSON file, the annotation (or image) id and
the image file, or is skipped and counted in a :class:`SkipCounter`:

==========================  ==================================================
reason                      what
==========================  ==================================================
missing_image               the image file does not exist (image skipped)
corrupt_image               PIL cannot decode it (image skipped)
image_size_mismatch         decoded size differs from the JSON's height/width
unknown_image               annotation's image_id is not in ``images``
unknown_category            annotation's category_id is not in ``categories``
bad_box                     zero-area, negative or non-finite box
box_outside_image           box has no area left after clipping to the image
empty_segmentation          ``segmentation`` empty or missing
polygon_lt_3_points         no polygon with >= 3 points
polygon_part_lt_3_points    one part of a multi-part polygon dropped
bad_rle                     RLE of the wrong size / malformed
==========================  ==================================================

Boxes slightly outside the image are clipped (not counted); a missing
``bbox`` is computed from the mask; a missing ``area`` is the mask's area.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Iterator

import numpy as np
import PIL

from maskrcnn_jax.data import features, images, masks
from maskrcnn_jax.data.categories import CategoryMap
from maskrcnn_jax.data.errors import DatasetError, SkipCounter


def load_coco_json(path: str) -> dict[str, Any]:
    """Loads an instances JSON and checks its top-level structure.

    Raises:
      DatasetError: missing file, invalid JSON, missing ``images`` /
        ``annotations`` / ``categories``, or duplicate category ids.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level is not an object")
    for key in ("images", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: no '{key}' list")
    data.setdefault("annotations", [])
    ids = [c.get("id") for c in data["categories"]]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate category ids in 'categories'")
    return data


def category_map_from_json(path: str) -> CategoryMap:
    """The contiguous label map of an instances JSON's ``categories``."""
    return CategoryMap.from_coco_categories(load_coco_json(path)["categories"])


def generate_coco_examples(
    annotations_path: str,
    images_dir: str,
    categories: CategoryMap,
    counter: SkipCounter,
    stats: dict[str, Any] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(image_id, stored example)`` for every usable image of a split.

    Images without annotations are yielded with zero objects.

    Args:
      annotations_path: the split's instances JSON.
      images_dir: folder that ``file_name`` is relative to.
      categories: the label map (the train split's).
      counter: raises or counts bad items.
      stats: if given, filled at the end with ``num_images``,
        ``num_annotations``, ``num_crowd``, ``num_without_instances`` (images
        with no non-crowd instance: what ``drop_empty_images`` drops) and
        ``instances_per_image`` (a histogram ``{str(count): num_images}``).

    Raises:
      DatasetError: a bad item when ``counter.skip`` is False, or a duplicate
        image id.
    """
    data = load_coco_json(annotations_path)
    name = annotations_path
    image_ids = set()
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise DatasetError(f"{name}: image entry without 'id' or 'file_name': {img}")
        if img["id"] in image_ids:
            raise DatasetError(f"{name}: duplicate image id {img['id']}")
        image_ids.add(img["id"])

    anns_by_image: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for ann in data["annotations"]:
        aid = ann.get("id")
        if ann.get("image_id") not in image_ids:
            counter.bad(
                "unknown_image",
                f"{name}: annotation id {aid}: image id {ann.get('image_id')} is not in 'images'",
            )
            continue
        anns_by_image[ann["image_id"]].append(ann)

    histogram: collections.Counter[int] = collections.Counter()
    num_annotations = num_crowd = num_images = num_without_instances = 0
    for img in data["images"]:
        example = _image_example(img, anns_by_image.get(img["id"], []), images_dir, name,
                                 categories, counter)
        if example is None:
            continue
        n = len(example["objects"]["id"])
        histogram[n] += 1
        num_images += 1
        num_annotations += n
        num_crowd += int(example["objects"]["is_crowd"].sum())
        num_without_instances += bool(np.all(example["objects"]["is_crowd"]))
        yield int(img["id"]), example

    if stats is not None:
        stats.update(
            num_images=num_images,
            num_annotations=num_annotations,
            num_crowd=num_crowd,
            num_without_instances=num_without_instances,
            instances_per_image={str(k): v for k, v in sorted(histogram.items())},
        )


def _image_example(
    img: dict[str, Any],
    anns: list[dict[str, Any]],
    images_dir: str,
    name: str,
    categories: CategoryMap,
    counter: SkipCounter,
) -> dict[str, Any] | None:
    """The stored example of one image, or None if the image is skipped."""
    file_name = str(img["file_name"])
    path = os.path.join(images_dir, file_name)
    where = f"{name}: image id {img['id']} ({path})"
    try:
        data, height, width = images.read_image_for_storage(path)
    except FileNotFoundError:
        counter.bad("missing_image", f"{where}: image file not found ({len(anns)} annotations)")
        return None
    except (OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError) as e:
        counter.bad("corrupt_image", f"{where}: cannot decode image ({type(e).__name__}: {e})")
        return None
    json_size = (img.get("height"), img.get("width"))
    if None not in json_size and tuple(json_size) != (height, width):
        counter.bad(
            "image_size_mismatch",
            f"{where}: image is {height}x{width}, JSON says {json_size[0]}x{json_size[1]}",
        )
        return None

    ids, boxes, labels, crowd, areas, rles = [], [], [], [], [], []
    for ann in anns:
        obj = _annotation(ann, height, width, f"{name}: annotation id {ann.get('id')} "
                          f"(image {file_name})", categories, counter)
        if obj is None:
            continue
        ids.append(int(ann.get("id", -1)))
        boxes.append(obj[0])
        labels.append(obj[1])
        crowd.append(bool(ann.get("iscrowd", 0)))
        areas.append(obj[2])
        rles.append(obj[3])
    return features.make_example(
        data, img["id"], file_name, height, width, ids, np.asarray(boxes, np.float32),
        labels, crowd, areas, rles,
    )


def _annotation(
    ann: dict[str, Any],
    height: int,
    width: int,
    where: str,
    categories: CategoryMap,
    counter: SkipCounter,
) -> tuple[np.ndarray, int, float, bytes] | None:
    """(box xyxy, label, area, rle counts) of one annotation, or None if skipped."""
    try:
        label = categories.label_of(ann.get("category_id"))
    except (KeyError, TypeError, ValueError):
        counter.bad("unknown_category", f"{where}: unknown category id {ann.get('category_id')}")
        return None
    try:
        rle, dropped = masks.segmentation_to_rle(
            ann.get("segmentation"), height, width, drop_bad_parts=counter.skip
        )
    except masks.SegmentationError as e:
        counter.bad(e.reason, f"{where}: {e}")
        return None
    for _ in range(dropped):
        counter.bad("polygon_part_lt_3_points", f"{where}: polygon part with < 3 points dropped")
    mask_area, mask_box = masks.rle_area_and_box(rle, height, width)

    bbox = ann.get("bbox")
    if bbox is None:
        box = mask_box
        if mask_area <= 0:
            counter.bad("bad_box", f"{where}: no 'bbox' and an empty mask")
            return None
    else:
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            counter.bad("bad_box", f"{where}: malformed bbox {bbox}")
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            counter.bad("bad_box", f"{where}: zero-area or negative box {bbox} (xywh)")
            return None
        box = np.array([x, y, x + w, y + h], np.float32)
    box = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        counter.bad(
            "box_outside_image", f"{where}: box {bbox} lies outside the {height}x{width} image"
        )
        return None
    area = float(ann["area"]) if "area" in ann else mask_area
    return box, label, area, rle
