"""Training: sharded step == single device, exact resume, overfitting, bad steps."""

from __future__ import annotations

import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import data, sharding, train
from maskrcnn_jax.modeling import MaskRCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "experiments", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for k, v in train_overrides.items():
        config.train[k] = v
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config()
    config.dataset.data_dir = str(tmp_path_factory.mktemp("data"))
    with data.make_train_iterator(config.dataset, seed=0, batch_size=8) as it:
        batch = {k: next(it)[k] for k in train.TRAIN_KEYS}
    state, optimizer = train.create_train_state(config, lambda p: train.make_optimizer(config, p), jax.random.key(0), (64, 64))
    step = train.make_train_step(MaskRCNN(config.model), config, optimizer)
    return config, batch, state, step


def _run_on_mesh(step, state, batch, num_devices):
    mesh = sharding.make_mesh(num_devices)
    state_sharding = sharding.tree_replicated(state, mesh)
    fn = jax.jit(step, in_shardings=(state_sharding, sharding.data_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))
    with mesh:
        return fn(jax.device_put(state, state_sharding), sharding.global_batch(batch, mesh))


def test_eight_devices_equal_one(setup):
    config, batch, state, step = setup
    assert jax.device_count() == 8
    s8, m8 = _run_on_mesh(step, state, batch, 8)
    s1, m1 = _run_on_mesh(step, state, batch, 1)
    assert bool(m8["finite"]) and float(m8["loss"]) > 0
    for k in ("loss", "rpn_objectness_loss", "rpn_box_loss", "classifier_loss", "box_loss", "mask_loss"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    chex.assert_trees_all_close(jax.device_get(s8.params), jax.device_get(s1.params), rtol=1e-3, atol=1e-5)
    # The step really moved the parameters.
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0


def test_non_finite_step_is_skipped_and_counted(setup):
    config, batch, state, step = setup
    bad = dict(batch, image=np.full(batch["image"].shape, np.nan, np.float32))
    new, metrics = jax.jit(step)(state, bad)
    assert not bool(metrics["finite"])
    assert int(new.bad_steps) == 1 and int(new.skipped_steps) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(new.params, state.params)


def test_learning_rate_schedule():
    config = tiny_config(base_lr=0.02, batch_size=8, warmup_steps=10, warmup_factor=0.001, decay_steps=(20, 30))
    lr = train.learning_rate_schedule(config.train)
    base = 0.02 * 8 / 16
    np.testing.assert_allclose(lr(0), base * 0.001, rtol=1e-6)
    np.testing.assert_allclose(lr(5), base * (0.001 * 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose([lr(10), lr(19), lr(20), lr(30)], [base, base, base * 0.1, base * 0.01], rtol=1e-5)


def test_frozen_and_decay_masks():
    params = {"backbone": {"conv1": {"kernel": jnp.ones((3, 3, 3, 8))}, "layer1_0": {"conv1": {"kernel": jnp.ones((3, 3, 8, 8))}},
                           "layer2_0": {"conv1": {"kernel": jnp.ones((3, 3, 8, 8)), "bias": jnp.ones(8)}}}}
    frozen = train.frozen_mask(params, freeze_at=2)
    assert frozen["backbone"]["conv1"]["kernel"] and frozen["backbone"]["layer1_0"]["conv1"]["kernel"]
    assert not frozen["backbone"]["layer2_0"]["conv1"]["kernel"]
    decay = train.decay_mask(params, decay_norm_and_bias=False)
    assert decay["backbone"]["layer2_0"]["conv1"]["kernel"] and not decay["backbone"]["layer2_0"]["conv1"]["bias"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data_dir = str(tmp_path / "data")
    full = tiny_config(steps=4)
    full.dataset.data_dir = data_dir
    train.train_and_evaluate(full, str(tmp_path / "full"))

    part = tiny_config(steps=2)
    part.dataset.data_dir = data_dir
    train.train_and_evaluate(part, str(tmp_path / "resumed"))
    part.train.steps = 4  # the same command with more steps resumes at step 2
    train.train_and_evaluate(part, str(tmp_path / "resumed"))

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3, 4)], [a[s] for s in (1, 2, 3, 4)], rtol=1e-6)
    va, _ = ckpt.load_model(str(tmp_path / "full"))
    vb, config_b = ckpt.load_model(str(tmp_path / "resumed"))
    chex.assert_trees_all_close(va, vb, rtol=1e-6, atol=1e-7)
    assert config_b.class_names == ["__background__", "circle", "square", "triangle"] or len(config_b.class_names) == 4


def test_overfits_a_handful_of_images(tmp_path):
    """A tiny model memorises 8 shapes images: losses collapse, masks match."""
    from maskrcnn_jax.inference import Predictor

    config = tiny_config(steps=150, base_lr=0.04, warmup_steps=10, decay_steps=(120,), clip_norm=10.0)
    config.dataset.shapes.num_train = 8
    config.dataset.flip = False
    config.dataset.data_dir = str(tmp_path / "data")
    config.log_every = 10
    config.checkpoint_every = 1000
    train.train_and_evaluate(config, str(tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    first, last = losses[10], losses[150]
    assert last < first / 4, (first, last)

    # Compare predicted masks with the full-resolution ground truth of the
    # same 8 images, exported in COCO format.
    from pycocotools import mask as mask_utils

    from maskrcnn_jax.image_io import load_image

    s = config.dataset.shapes
    ann_path, images_dir = data.write_shapes_coco(
        str(tmp_path / "coco"), "train", 8, s.image_size, s.seed,
        min_shapes=s.min_shapes, max_shapes=s.max_shapes, min_size=s.min_size, max_size=s.max_size,
    )
    with open(ann_path) as f:
        coco = json.load(f)
    predictor = Predictor.from_checkpoint(str(tmp_path / "run"))
    ious = []
    for image in coco["images"]:
        pred = predictor([load_image(os.path.join(images_dir, image["file_name"]))])[0]
        pred_masks = np.asarray(pred["masks"]) > 0.5
        labels = np.asarray(pred["labels"])
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            gt = mask_utils.decode(ann["segmentation"]).astype(bool)
            label = model_config_label(predictor, ann["category_id"])
            same = pred_masks[labels == label]
            inter = (same & gt).sum((1, 2))
            union = (same | gt).sum((1, 2))
            ious.append(float((inter / np.maximum(union, 1)).max()) if len(same) else 0.0)
    assert len(ious) >= 8 and np.mean(ious) > 0.7, ious


def model_config_label(predictor, category_id):
    """Contiguous label of a dataset category id, from the checkpoint's config."""
    ids = list(predictor.config.category_ids)
    return ids.index(category_id)
