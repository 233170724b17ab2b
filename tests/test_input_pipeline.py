"""Aspect-ratio canvases in the input pipeline: the grouped order, record sizes, resume,
several processes.

The fixture is a COCO-format set of nine small images, five landscape (one of
them square, one without annotations) and four portrait, so that both
orientations fill batches of two.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from maskrcnn_jax import data
from maskrcnn_jax.data import input_pipeline, record_sizes, transforms
from maskrcnn_jax.data.aspect_groups import AspectGroupedOrder
from tests.test_data import coco_config

tfds.disable_progress_bar()

LANDSCAPE, PORTRAIT = (64, 96), (96, 64)
# image id -> (height, width); id 5 has no annotation.
SIZES = {1: (48, 64), 2: (40, 80), 3: (32, 32), 4: (30, 50), 5: (36, 48),
         6: (64, 48), 7: (80, 40), 8: (50, 30), 9: (48, 36)}  # fmt: skip
EMPTY_ID = 5


def write_mixed_orientation_coco(root: str) -> tuple[str, str]:
    """Writes the fixture (one rectangle of category 1..3 per annotated image).

    Returns:
      (annotations json, images dir).
    """
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id, (h, w) in SIZES.items():
        name = f"{image_id}.png"
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(img_dir, name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        if image_id == EMPTY_ID:
            continue
        x0, y0, x1, y1 = w // 4, h // 4, 3 * w // 4, 3 * h // 4
        anns.append({
            "id": 100 + image_id, "image_id": image_id, "category_id": 1 + image_id % 3,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        })  # fmt: skip
    categories = [{"id": i, "name": n} for i, n in ((1, "a"), (2, "b"), (3, "c"))]
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return path, img_dir


def aspect_dataset_config(root: str, ann: str, imgs: str, **overrides) -> ml_collections.ConfigDict:
    """The fixture's dataset config: canvases 64x96 / 96x64, shorter side 64, longer <= 96."""
    fields = {"aspect_canvases": (LANDSCAPE, PORTRAIT), "scales": (64,), **overrides}
    return coco_config(root, ann, imgs, **fields)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixed"))
    ann, imgs = write_mixed_orientation_coco(root)
    return lambda **overrides: aspect_dataset_config(root, ann, imgs, **overrides)


# ------------------------------------------------------------------ the order alone


def test_grouped_order_batches_are_one_orientation_and_epochs_permutations():
    rng = np.random.default_rng(0)
    portrait = rng.random(23) < 0.4
    usable = np.ones(23, bool)
    usable[[3, 17]] = False
    order = AspectGroupedOrder(portrait, usable, batch_size=4, seed=7)
    n_port = int(portrait[usable].sum())
    n_land = int(usable.sum()) - n_port
    assert (order.num_landscape, order.num_portrait) == (n_land, n_port)
    k = n_land // 4 + n_port // 4
    assert order.batches_per_epoch == k and order.images_per_epoch == 4 * k
    plans = [order.epoch_plan(e) for e in range(3)]
    for plan in plans:
        assert plan.shape == (k, 4)
        assert len(np.unique(plan)) == plan.size  # No record twice in an epoch.
        assert usable[plan].all()
        for row in plan:  # One orientation per global batch.
            assert len(set(portrait[row].tolist())) == 1
        assert int(portrait[plan[:, 0]].sum()) == n_port // 4
    assert not np.array_equal(plans[0], plans[1])  # Reshuffled every epoch.
    # A function of (seed, epoch, orientations) only: a fresh object, epochs asked
    # in another order, gives the same plans; another seed does not.
    again = AspectGroupedOrder(portrait, usable, batch_size=4, seed=7)
    for e in (2, 0, 1):
        np.testing.assert_array_equal(again.epoch_plan(e), plans[e])
    assert not np.array_equal(
        AspectGroupedOrder(portrait, usable, 4, seed=8).epoch_plan(0), plans[0]
    )
    # Position t -> row t % B of batch t // B, across the epoch boundary.
    for t in (0, 5, 4 * k - 1, 4 * k, 4 * k + 6):
        meta = order[t]
        assert meta.index == t
        assert meta.record_key == plans[t // (4 * k)][(t // 4) % k, t % 4]
        assert order.portrait_batch(t // 4) == bool(portrait[meta.record_key])
    # grain's per-position augmentation generator, as IndexSampler draws it.
    np.testing.assert_array_equal(
        order[9].rng.integers(0, 2**31, 4),
        np.random.Generator(np.random.Philox(key=7 + 9)).integers(0, 2**31, 4),
    )


def test_grouped_order_needs_one_full_batch():
    with pytest.raises(ValueError, match="fewer than the batch size 4 of either"):
        AspectGroupedOrder(np.array([0, 0, 0, 1, 1, 1], bool), np.ones(6, bool), 4, seed=0)


# ------------------------------------------------------------------ record sizes


def test_record_sizes_read_once_then_loaded(mixed, monkeypatch):
    cfg = mixed()
    prepared = data.prepare_dataset(cfg)
    source = prepared.data_source("train")
    path = record_sizes.record_sizes_path(prepared, "train")
    if os.path.exists(path):
        os.remove(path)
    sizes = record_sizes.record_sizes(prepared, "train")
    assert os.path.exists(path)
    for i in range(len(source)):  # Data-source order, as stored.
        image_id = int(source[i]["image_id"])
        assert (sizes.height[i], sizes.width[i]) == SIZES[image_id]
        assert sizes.num_instances[i] == (0 if image_id == EMPTY_ID else 1)

    def fail(*args):
        raise AssertionError("the split was read again")

    monkeypatch.setattr(record_sizes, "_read_sizes", fail)
    cached = record_sizes.record_sizes(prepared, "train")
    np.testing.assert_array_equal(cached.height, sizes.height)
    np.save(path, np.zeros((3, 3), np.int32))  # Not this split's: read again.
    with pytest.raises(AssertionError, match="read again"):
        record_sizes.record_sizes(prepared, "train")


# ------------------------------------------------------------------ the iterator


def _orientation(batch) -> str:
    portrait = transforms.is_portrait(batch["original_size"][:, 0], batch["original_size"][:, 1])
    assert len(set(portrait.tolist())) == 1, "a batch mixes orientations"
    return "portrait" if portrait[0] else "landscape"


def test_each_batch_one_orientation_on_its_canvas(mixed):
    cfg = mixed(drop_empty_images=True)
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        batches = input_pipeline.take(it, 8)  # Two epochs of 2 + 2 batches.
    with data.make_train_iterator(cfg, seed=0, batch_size=2) as it:
        again = input_pipeline.take(it, 8)
    kinds = []
    for b, b2 in zip(batches, again):
        kind = _orientation(b)
        kinds.append(kind)
        canvas = LANDSCAPE if kind == "landscape" else PORTRAIT
        assert b["image"].shape == (2, *canvas, 3)
        assert (b["image_size"] <= np.array(canvas)).all()
        assert b["valid_image"].all()
        for k in b:  # Deterministic.
            np.testing.assert_array_equal(b[k], b2[k])
    assert kinds[:4].count("portrait") == 2 and kinds[4:].count("portrait") == 2
    for epoch in (batches[:4], batches[4:]):  # 8 usable images, each once an epoch.
        ids = sorted(int(i) for b in epoch for i in b["image_id"])
        assert ids == sorted(set(SIZES) - {EMPTY_ID})


def test_grouped_iterator_state_restore_reproduces_next_batches(mixed):
    """In-process (worker processes resume the same way: test_data.py; and they
    receive the grouped order in the two-process test below)."""
    cfg = mixed()
    with data.make_train_iterator(cfg, seed=1, batch_size=2) as it:
        input_pipeline.take(it, 3)
        state = it.get_state()
        expected = input_pipeline.take(it, 5)  # Crosses into the next epoch.
    with data.make_train_iterator(cfg, seed=1, batch_size=2) as it:
        it.set_state(state)
        got = input_pipeline.take(it, 5)
    assert {_orientation(b) for b in expected} == {"landscape", "portrait"}
    for u, v in zip(expected, got):
        for k in u:
            np.testing.assert_array_equal(u[k], v[k], err_msg=k)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_feed_the_same_orientation(mixed, workers):
    """Process 0 and 1 of 2: same canvas at every step; their rows make the 1-process batch."""
    cfg = mixed(num_workers=workers, drop_empty_images=True)
    with data.make_train_iterator(cfg, seed=2, batch_size=4) as it:
        whole = input_pipeline.take(it, 4)  # Epoch: 8 usable = 1 + 1 batches of 4.
    shares = []
    for p in range(2):
        with data.make_train_iterator(
            cfg, seed=2, process_index=p, process_count=2, batch_size=4
        ) as it:
            shares.append(input_pipeline.take(it, 4))
    assert {_orientation(b) for b in whole} == {"landscape", "portrait"}
    for n, batch in enumerate(whole):
        assert (
            shares[0][n]["image"].shape
            == shares[1][n]["image"].shape
            == (2, *batch["image"].shape[1:])
        )
        assert _orientation(shares[0][n]) == _orientation(shares[1][n]) == _orientation(batch)
        for k in batch:
            np.testing.assert_array_equal(
                batch[k], np.concatenate([s[n][k] for s in shares]), err_msg=f"{k} {n}"
            )
        assert EMPTY_ID not in batch["image_id"]


def test_bad_canvases_are_one_line_errors(mixed):
    for canvases, message in [
        (((64, 80), PORTRAIT), r"landscape canvas \(64, 80\) cannot hold .* up to 64x96"),
        ((LANDSCAPE, (80, 64)), r"portrait canvas \(80, 64\) cannot hold .* up to 96x64"),
        ((LANDSCAPE,), "expected \\(\\) or two \\(H, W\\) canvases"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            transforms.InputSpec.from_config(mixed(aspect_canvases=canvases))
        assert "\n" not in str(e.value)
    lsj = mixed()
    lsj.lsj.enabled = True
    with pytest.raises(ValueError, match="lsj.enabled"):
        transforms.InputSpec.from_config(lsj)
