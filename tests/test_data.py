"""Datasets and the input pipeline, built for real from tiny files made here.

The COCO-format fixture has: a JPEG, a grayscale PNG, an RGBA PNG, a 16-bit
PNG and an image without annotations; polygons (one multi-part), compressed
RLE, a crowd uncompressed RLE, non-contiguous category ids listed out of order,
one annotation without ``area``, and one bad annotation (a 2-point polygon).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import chex
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax import batch, data
from maskrcnn_jax.data import coco_json, input_pipeline, masks, transforms
from maskrcnn_jax.data.errors import DatasetError, SkipCounter
from maskrcnn_jax.data.features import objects_as_arrays
from maskrcnn_jax.data.images import decode_image

tfds.disable_progress_bar()

CATEGORIES = [{"id": 11, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
LABEL = {3: 1, 7: 2, 11: 3}  # Contiguous labels in category-id order.


def _rect_poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco_fixture(root: str, bad: bool = True) -> tuple[str, str]:
    """Writes the fixture; returns (annotations json, images dir)."""
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        os.path.join(img_dir, "a.jpg"), quality=95)
    Image.fromarray(np.full((50, 40), 77, np.uint8), "L").save(os.path.join(img_dir, "b.png"))
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(os.path.join(img_dir, "c.png"))
    Image.fromarray(np.full((30, 50), 65535, np.uint16)).save(os.path.join(img_dir, "d.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(img_dir, "e.jpg"))
    images = [
        {"id": 10, "file_name": "a.jpg", "height": 60, "width": 80},
        {"id": 20, "file_name": "b.png", "height": 50, "width": 40},
        {"id": 30, "file_name": "c.png", "height": 40, "width": 40},
        {"id": 40, "file_name": "d.png", "height": 30, "width": 50},
        {"id": 50, "file_name": "e.jpg", "height": 32, "width": 32},
    ]
    crowd = np.zeros((60, 80), np.uint8)
    crowd[40:55, 50:75] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    # Uncompressed (list) RLE, column-major runs, as COCO stores crowd regions.
    flat = crowd.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    b_mask = np.zeros((50, 40), np.uint8)
    b_mask[5:45, 10:30] = 1
    b_rle = mask_utils.encode(np.asfortranarray(b_mask))
    anns = [
        {"id": 101, "image_id": 10, "category_id": 7, "bbox": [10, 10, 30, 20], "area": 600,
         "iscrowd": 0, "segmentation": [_rect_poly(10, 10, 40, 30)]},
        {"id": 102, "image_id": 10, "category_id": 3, "bbox": [50, 40, 25, 15], "area": 375,
         "iscrowd": 1, "segmentation": {"size": [60, 80], "counts": runs}},
        {"id": 103, "image_id": 20, "category_id": 11, "bbox": [10, 5, 20, 40], "area": 800,
         "iscrowd": 0, "segmentation": {"size": [50, 40], "counts": b_rle["counts"].decode()}},
        {"id": 104, "image_id": 30, "category_id": 3, "bbox": [5, 5, 30, 30], "iscrowd": 0,
         "segmentation": [[5, 5, 35, 5, 20, 35]]},
        {"id": 105, "image_id": 40, "category_id": 7, "bbox": [2, 2, 46, 20], "area": 300,
         "iscrowd": 0, "segmentation": [_rect_poly(2, 2, 12, 22), _rect_poly(38, 2, 48, 22)]},
    ]
    if bad:
        anns.append({"id": 106, "image_id": 40, "category_id": 3, "bbox": [1, 1, 5, 5],
                     "iscrowd": 0, "segmentation": [[1, 1, 6, 6]]})
    path = os.path.join(root, "instances_train.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    assert np.array_equal(mask_utils.decode(crowd_rle), crowd)
    return path, img_dir


def coco_config(root: str, ann: str, imgs: str, **overrides) -> ml_collections.ConfigDict:
    c = data.get_dataset_config("coco")
    c.data_dir = os.path.join(root, "prepared")
    c.train_annotations, c.train_images = ann, imgs
    c.val_annotations, c.val_images = ann, imgs
    c.image_size = (96, 96)
    c.aspect_canvases = ()  # One canvas (test_input_pipeline.py tests the two of the preset).
    c.scales = (64, 80)
    c.max_size = 96
    c.max_instances = 4
    c.mask_size = 16
    c.num_workers = 0
    c.drop_empty_images = False  # The coco preset drops them; these tests see every image.
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    ann, imgs = write_coco_fixture(root)
    cfg = coco_config(root, ann, imgs, skip_bad_annotations=True)
    return cfg, data.prepare_dataset(cfg)


def _by_id(source):
    return {int(source[i]["image_id"]): source[i] for i in range(len(source))}


def test_coco_builder_stores_every_field(coco):
    cfg, prepared = coco
    assert prepared.splits == ("train", "validation")
    assert prepared.categories.category_ids == (3, 7, 11)
    assert prepared.categories.names == ("cat", "dog", "bird")
    assert prepared.categories.category_id_of([1, 2, 3]).tolist() == [3, 7, 11]
    assert data.get_category_map(cfg) == prepared.categories
    stats = prepared.split_stats["train"]
    assert stats["num_images"] == 5 and stats["num_annotations"] == 5 and stats["num_crowd"] == 1
    assert stats["skipped"] == {"polygon_lt_3_points": 1}  # Annotation 106.
    assert prepared.num_skipped("train") == 1
    assert stats["instances_per_image"] == {"0": 1, "1": 3, "2": 1}
    assert stats["num_without_instances"] == 1  # Image 50.

    ex = _by_id(prepared.data_source("train"))
    assert sorted(ex) == [10, 20, 30, 40, 50]
    a = ex[10]
    assert a["file_name"] in (b"a.jpg", "a.jpg") and (a["height"], a["width"]) == (60, 80)
    obj = objects_as_arrays(a)
    assert obj["id"].tolist() == [101, 102]
    np.testing.assert_allclose(obj["bbox"], [[10, 10, 40, 30], [50, 40, 75, 55]])
    assert obj["label"].tolist() == [LABEL[7], LABEL[3]]
    assert obj["is_crowd"].tolist() == [False, True]
    np.testing.assert_allclose(obj["area"], [600, 375])
    m = masks.decode_rles(obj["mask"], 60, 80)
    ref_poly = mask_utils.decode(mask_utils.merge(
        mask_utils.frPyObjects([_rect_poly(10, 10, 40, 30)], 60, 80)))
    np.testing.assert_array_equal(m[0], ref_poly)
    assert m[1][40:55, 50:75].all() and m[1].sum() == 15 * 25  # Crowd RLE, exact.

    b = objects_as_arrays(ex[20])
    assert b["label"].tolist() == [LABEL[11]]
    assert masks.decode_rles(b["mask"], 50, 40)[0][5:45, 10:30].all()
    c = objects_as_arrays(ex[30])
    assert c["area"][0] == pytest.approx(masks.decode_rles(c["mask"], 40, 40)[0].sum())
    d = objects_as_arrays(ex[40])
    assert d["id"].tolist() == [105]  # 106 skipped; multi-part polygon kept whole.
    assert masks.decode_rles(d["mask"], 30, 50)[0][:, 25].sum() == 0
    assert len(objects_as_arrays(ex[50])["id"]) == 0  # Image without annotations kept.

    # Mode conversions happen on decode: gray, RGBA (alpha dropped), 16-bit.
    assert decode_image(ex[20]["image"]).shape == (50, 40, 3)
    assert (decode_image(ex[20]["image"]) == 77).all()
    np.testing.assert_array_equal(decode_image(ex[30]["image"])[0, 0], [200, 0, 0])
    assert (decode_image(ex[40]["image"]) == 255).all()


def test_preparing_twice_reuses_the_files(coco):
    cfg, prepared = coco
    files = sorted(os.listdir(prepared.builder.data_dir))
    mtime = os.path.getmtime(os.path.join(prepared.builder.data_dir, "dataset_info.json"))
    again = data.prepare_dataset(cfg)
    assert again.builder.data_dir == prepared.builder.data_dir
    assert sorted(os.listdir(again.builder.data_dir)) == files
    assert os.path.getmtime(os.path.join(again.builder.data_dir, "dataset_info.json")) == mtime
    assert again.split_stats == prepared.split_stats


def test_strict_preparation_names_file_and_annotation(tmp_path):
    ann, imgs = write_coco_fixture(str(tmp_path))
    cfg = coco_config(str(tmp_path), ann, imgs, skip_bad_annotations=False)
    msg = r"instances_train\.json: annotation id 106 .*fewer than 3"
    with pytest.raises(DatasetError, match=msg):
        data.prepare_dataset(cfg)


def _deterministic_pass(cfg, split: str = "validation") -> dict[str, np.ndarray]:
    """Every record of a split through the deterministic transform, plus one empty example."""
    spec = data.InputSpec.from_config(cfg)
    source = data.prepare_dataset(cfg).data_source(split)
    examples = [data.preprocess(source[i], spec, train=False) for i in range(len(source))]
    examples.append(transforms.empty_example(spec))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_deterministic_transform_of_a_split(coco):
    """No augmentation: no flip, no crop, the largest of ``scales`` as shorter side."""
    cfg, _ = coco
    cfg = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations, cfg.train_images,
                      skip_bad_annotations=True, scales=(48, 64))
    b = _deterministic_pass(cfg)
    assert set(b) == set(data.BATCH_KEYS) == set(batch.BATCH_KEYS)
    chex.assert_shape(b["image"], (6, 96, 96, 3))
    chex.assert_shape(b["boxes"], (6, 4, 4))
    chex.assert_shape(b["masks"], (6, 4, 16, 16))
    assert b["image"].dtype == np.uint8 and b["masks"].dtype == np.uint8
    assert b["valid_image"].tolist() == [True] * 5 + [False]
    assert sorted(b["image_id"][:5].tolist()) == [10, 20, 30, 40, 50] and b["image_id"][5] == -1
    i = b["image_id"].tolist().index(10)
    scale = 64 / 60
    np.testing.assert_array_equal(b["original_size"][i], [60, 80])
    np.testing.assert_array_equal(b["image_size"][i], [64, 85])
    assert b["scale"][i] == pytest.approx(scale)
    np.testing.assert_allclose(b["boxes"][i, :2], [[10 * 85 / 80, 10 * 64 / 60, 40 * 85 / 80,
                                                    30 * 64 / 60], [50 * 85 / 80, 40 * 64 / 60,
                                                    75 * 85 / 80, 55 * 64 / 60]], rtol=1e-5)
    assert b["valid"][i].tolist() == [True, True, False, False]
    assert b["labels"][i].tolist() == [2, 1, 0, 0] and b["is_crowd"][i].tolist()[:2] == [0, 1]
    assert b["masks"][i, 0].all() and b["masks"][i, 1].all()  # Rectangles fill their boxes.
    assert not b["labels"][~b["valid"]].any() and not b["masks"][~b["valid"]].any()
    assert not b["valid"][5].any()


def test_truncation_warned_up_front_and_counted_per_example(coco, caplog):
    cfg, _ = coco
    cfg = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations, cfg.train_images,
                      skip_bad_annotations=True, max_instances=1)
    with caplog.at_level(logging.WARNING):
        data.make_train_iterator(cfg, seed=0, batch_size=2).close()
    assert "1 images have more than max_instances=1" in caplog.text
    b = _deterministic_pass(cfg, "train")
    assert int(b["num_truncated"].sum()) == 1  # Image 10's crowd.
    assert b["masks"].shape[1] == 1


def test_train_iterator_deterministic_and_drops_empty_on_request(coco, caplog):
    cfg, _ = coco
    with (data.make_train_iterator(cfg, seed=3, batch_size=2) as a,
          data.make_train_iterator(cfg, seed=3, batch_size=2) as b):
        xa, xb = input_pipeline.take(a, 4), input_pipeline.take(b, 4)
    for u, v in zip(xa, xb):
        for k in u:
            np.testing.assert_array_equal(u[k], v[k])
    # Each epoch of 5 images (2.5 batches) is a permutation; epochs differ.
    ids = np.concatenate([x["image_id"] for x in xa])
    assert sorted(ids[:5].tolist()) == [10, 20, 30, 40, 50]
    with data.make_train_iterator(cfg, seed=4, batch_size=2) as c:
        xc = input_pipeline.take(c, 4)
    assert any(not np.array_equal(u["image"], v["image"]) for u, v in zip(xa, xc))

    cfg_drop = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations,
                           cfg.train_images, skip_bad_annotations=True, drop_empty_images=True)
    with caplog.at_level(logging.INFO), data.make_train_iterator(cfg_drop, seed=0,
                                                                 batch_size=2) as d:
        ids = np.concatenate([x["image_id"] for x in input_pipeline.take(d, 6)])
    assert 50 not in ids and set(ids.tolist()) == {10, 20, 30, 40}
    assert "drop_empty_images: 1 of 5 train images have no non-crowd instance" in caplog.text
    assert data.train_epoch_size(cfg_drop) == 4 and data.train_epoch_size(cfg) == 5
    assert data.get_dataset_config("coco").drop_empty_images


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restore_reproduces_next_batches(coco, workers):
    cfg, _ = coco
    cfg = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations, cfg.train_images,
                      skip_bad_annotations=True, num_workers=workers)
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        input_pipeline.take(it, 2)
        state = it.get_state()
        expected = input_pipeline.take(it, 3)
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        it.set_state(state)
        got = input_pipeline.take(it, 3)
    for u, v in zip(expected, got):
        for k in u:
            np.testing.assert_array_equal(u[k], v[k])


@pytest.mark.parametrize("workers", [0, 2])
def test_train_iterator_global_batch_independent_of_process_count(coco, workers):
    """2 processes x 1 row, concatenated in process order, = 1 process x 2 rows, batch by batch."""
    cfg, _ = coco
    cfg = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations, cfg.train_images,
                      skip_bad_annotations=True, num_workers=workers)
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        whole = input_pipeline.take(it, 4)  # More than one epoch of the 5 records.
    shares = []
    for p in range(2):
        with data.make_train_iterator(cfg, seed=0, process_index=p, process_count=2,
                                      batch_size=2) as it:
            shares.append(input_pipeline.take(it, 4))
    for n, batch in enumerate(whole):
        assert all(s[n]["image"].shape[0] == 1 for s in shares)
        for k in batch:  # Same images, same augmentation, same order.
            np.testing.assert_array_equal(
                batch[k], np.concatenate([s[n][k] for s in shares]), err_msg=f"{k} {n}")
    ids = [int(i) for x in whole for i in x["image_id"]]
    assert set(ids[:4]) <= {10, 20, 30, 40, 50} and len(set(ids[:4])) == 4  # No repeat in-epoch.
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.make_train_iterator(cfg, seed=0, process_count=2, batch_size=3)
    with pytest.raises(ValueError, match="process_index 2 is not in 0..1"):
        data.make_train_iterator(cfg, seed=0, process_index=2, process_count=2, batch_size=2)


def test_train_iterator_with_workers_keeps_batches_full(coco):
    """Each grain worker batches its own share; every batch is full (remainders dropped)."""
    cfg, _ = coco
    cfg = coco_config(os.path.dirname(cfg.data_dir), cfg.train_annotations, cfg.train_images,
                      skip_bad_annotations=True, num_workers=2)
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        batches = input_pipeline.take(it, 4)
    assert len(batches) == 4 and all(x["image"].shape[0] == 2 for x in batches)
    ids = [int(i) for x in batches for i in x["image_id"]]
    assert set(ids) <= {10, 20, 30, 40, 50} and -1 not in ids


BAD_CASES = {
    "missing_image": lambda d: d["images"].append({"id": 99, "file_name": "nope.jpg"}),
    "corrupt_image": lambda d: d["images"].append({"id": 98, "file_name": "corrupt.jpg"}),
    "unknown_image": lambda d: d["annotations"].append(
        {"id": 201, "image_id": 12345, "category_id": 3, "bbox": [0, 0, 5, 5],
         "segmentation": [_rect_poly(0, 0, 5, 5)]}),
    "unknown_category": lambda d: d["annotations"].append(
        {"id": 202, "image_id": 10, "category_id": 4, "bbox": [0, 0, 5, 5],
         "segmentation": [_rect_poly(0, 0, 5, 5)]}),
    "bad_box": lambda d: d["annotations"].append(
        {"id": 203, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 4],
         "segmentation": [_rect_poly(5, 5, 9, 9)]}),
    "bad_box_negative": lambda d: d["annotations"].append(
        {"id": 204, "image_id": 10, "category_id": 3, "bbox": [5, 5, -3, 4],
         "segmentation": [_rect_poly(5, 5, 9, 9)]}),
    "polygon_lt_3_points": lambda d: d["annotations"].append(
        {"id": 205, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5],
         "segmentation": [[0, 0, 5, 5]]}),
    "empty_segmentation": lambda d: d["annotations"].append(
        {"id": 206, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "segmentation": []}),
}


@pytest.fixture(scope="module")
def clean_fixture(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clean"))
    ann, imgs = write_coco_fixture(root, bad=False)
    with open(os.path.join(imgs, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with open(ann) as f:
        return json.load(f), imgs, root


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_or_is_counted(clean_fixture, case):
    base, imgs, root = clean_fixture
    d = json.loads(json.dumps(base))
    BAD_CASES[case](d)
    path = os.path.join(root, f"{case}.json")
    with open(path, "w") as f:
        json.dump(d, f)
    cats = coco_json.category_map_from_json(path)
    reason = "bad_box" if case == "bad_box_negative" else case
    with pytest.raises(DatasetError) as err:
        list(coco_json.generate_coco_examples(path, imgs, cats, SkipCounter(False)))
    msg = str(err.value)
    assert "\n" not in msg and f"{case}.json" in msg
    if d["annotations"][-1]["id"] > 200 and case not in ("missing_image", "corrupt_image"):
        assert f"annotation id {d['annotations'][-1]['id']}" in msg
    else:
        assert "nope.jpg" in msg or "corrupt.jpg" in msg
    counter, stats = SkipCounter(True), {}
    examples = list(coco_json.generate_coco_examples(path, imgs, cats, counter, stats))
    assert dict(counter.counts) == {reason: 1}
    assert len(examples) == 5 and stats["num_annotations"] == 5
    assert reason in counter.summary("train")


def test_skip_summary_is_logged(tmp_path, caplog):
    ann, imgs = write_coco_fixture(str(tmp_path))
    cfg = coco_config(str(tmp_path), ann, imgs, skip_bad_annotations=True)
    cfg.val_annotations = cfg.val_images = ""
    with caplog.at_level(logging.WARNING):
        prepared = data.prepare_dataset(cfg)
    assert prepared.splits == ("train",)
    assert "skipped 1 bad items: polygon_lt_3_points=1" in caplog.text


def test_shapes_builder_and_its_coco_export_agree(tmp_path):
    cfg = data.get_dataset_config()
    cfg.data_dir = str(tmp_path / "prepared")
    cfg.shapes.num_train, cfg.shapes.num_val, cfg.shapes.image_size = 12, 4, 64
    cfg.shapes.max_size = 40
    cfg.image_size, cfg.scales, cfg.max_size = (64, 64), (64,), 64
    cfg.max_instances, cfg.mask_size, cfg.num_workers = 4, 16, 0
    prepared = data.prepare_dataset(cfg)
    assert prepared.categories == data.SHAPES_CATEGORIES
    assert prepared.split_stats["validation"]["num_images"] == 4
    ann, imgs = data.write_shapes_coco(str(tmp_path / "coco"), "validation", 4, 64, seed=0,
                                       max_size=40)
    coco_cfg = coco_config(str(tmp_path), ann, imgs)
    coco_cfg.train_annotations = coco_cfg.train_images = ""
    as_coco = data.prepare_dataset(coco_cfg)
    shapes_val = _by_id(prepared.data_source("validation"))
    coco_val = _by_id(as_coco.data_source("validation"))
    assert sorted(shapes_val) == sorted(coco_val) == [1, 2, 3, 4]
    for i in shapes_val:
        assert shapes_val[i]["image"] == coco_val[i]["image"]
        for k in ("bbox", "label", "mask", "is_crowd", "area"):
            np.testing.assert_array_equal(np.asarray(shapes_val[i]["objects"][k]),
                                          np.asarray(coco_val[i]["objects"][k]))
    # Default pipeline path on shapes: boxes are the tight boxes of the masks.
    with data.make_train_iterator(cfg, seed=0, batch_size=4) as it:
        batch = next(it)
    chex.assert_shape(batch["masks"], (4, 4, 16, 16))
    v = batch["valid"]
    assert v.any(axis=1).all() and set(batch["labels"][v].tolist()) <= {1, 2, 3}
    for c in batch["masks"][v]:  # The mask spans its crop (a thin apex may fall between cells).
        rows, cols = np.flatnonzero(c.any(1)), np.flatnonzero(c.any(0))
        assert rows[0] <= 1 and rows[-1] >= 14 and cols[0] <= 1 and cols[-1] >= 14


def test_dataset_config_names():
    c = data.get_dataset_config()
    assert c.name == "shapes" and c.image_size == (128, 128)
    for key in ("data_dir", "train_annotations", "train_images", "val_annotations", "val_images",
                "max_instances", "mask_size", "scales", "flip", "lsj", "skip_bad_annotations",
                "drop_empty_images", "num_workers", "prefetch", "shapes"):
        assert key in c, key
    for key in ("train_batch_size", "eval_batch_size", "eval_scale"):  # train.batch_size owns it.
        assert key not in c, key
    assert data.get_dataset_config("coco").max_size == 1333
    with pytest.raises(ValueError):
        data.get_dataset_config("voc")


# ---------------------------------------------------------------------------
# Clean exit: grain workers and their shared memory (each case a subprocess).
# ---------------------------------------------------------------------------

# Builds a train iterator with one grain worker, reads a batch and keeps it
# alive to the end (as a device buffer of the last step can), prints the
# workers' pids; then exits normally ("exit") or waits to be signalled
# ("wait"). A batch in a module global is collected during interpreter
# teardown, where grain's SharedMemoryArray.__del__ prints "Exception ignored"
# (its module is cleared by then): grain's noise, not a leak, so only the
# resource tracker's "leaked" reports are checked.
_CHILD = """
import json, multiprocessing, sys, time
from multiprocessing import resource_tracker
import ml_collections
from maskrcnn_jax import data
config = ml_collections.ConfigDict(json.loads(sys.argv[2]))
it = data.make_train_iterator(config, seed=0, batch_size=2)
KEEP = next(it)
workers = [p.pid for p in multiprocessing.active_children()]
print(json.dumps([workers, resource_tracker._resource_tracker._pid]), flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""
# Generous for a loaded 2-core machine; the worker notices its parent's death
# at once, and without that it lived on for minutes (hours in the issue).
_WORKER_EXIT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def shapes_one_worker(tmp_path_factory) -> str:
    """A prepared tiny shapes dataset; the config (JSON) reads it with one worker."""
    cfg = data.get_dataset_config()
    cfg.data_dir = str(tmp_path_factory.mktemp("shapes_one_worker"))
    cfg.shapes.num_train, cfg.shapes.num_val, cfg.shapes.image_size = 8, 2, 64
    cfg.image_size, cfg.scales, cfg.max_size = (64, 64), (64,), 64
    cfg.max_instances, cfg.mask_size, cfg.num_workers = 4, 8, 1
    data.prepare_dataset(cfg)
    return cfg.to_json()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _start_child(mode: str, config_json: str, stderr) -> tuple[subprocess.Popen, list[int], int]:
    """Starts ``_CHILD``; returns it, its worker pids and its resource tracker's pid.

    The tracker reports leaks on stderr when the last process using it is
    gone, so a test reads stderr only once the tracker has exited too.
    """
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, config_json],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline()
    assert line, "the child died before reading a batch"
    workers, tracker = json.loads(line)
    assert len(workers) == 1 and tracker
    return proc, workers, tracker


def test_normal_exit_leaks_no_shared_memory(shapes_one_worker, tmp_path):
    with open(tmp_path / "stderr", "w+") as err:
        proc, workers, tracker = _start_child("exit", shapes_one_worker, err)
        try:
            assert proc.wait(timeout=120) == 0
            assert _wait_gone(workers, _WORKER_EXIT_TIMEOUT_S) == []
            assert _wait_gone([tracker], _WORKER_EXIT_TIMEOUT_S) == []
        finally:
            _kill(proc, workers + [tracker])
        err.seek(0)
        stderr = err.read()
    assert "leaked" not in stderr, stderr  # Neither shared_memory nor semaphore objects.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_exit_when_the_parent_is_signalled(shapes_one_worker, tmp_path, sig):
    with open(tmp_path / "stderr", "w+") as err:
        proc, workers, tracker = _start_child("wait", shapes_one_worker, err)
        try:
            proc.send_signal(sig)
            code = proc.wait(timeout=120)
            assert _wait_gone(workers, _WORKER_EXIT_TIMEOUT_S) == []
            assert _wait_gone([tracker], _WORKER_EXIT_TIMEOUT_S) == []
        finally:
            _kill(proc, workers + [tracker])
        err.seek(0)
        stderr = err.read()
    if sig == signal.SIGTERM:
        # Iterators closed, then the process dies of the signal as before.
        assert code == -signal.SIGTERM, stderr
        assert "leaked" not in stderr, stderr
    else:
        assert code == -signal.SIGKILL


def _kill(proc: subprocess.Popen, pids: list[int]) -> None:
    """Leaves no process behind, whatever the test's outcome."""
    if proc.poll() is None:
        proc.kill()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = b"multiprocessing" in f.read()  # Not a reused pid.
        except FileNotFoundError:
            continue
        if ours and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
