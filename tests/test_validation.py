"""validation: the validation split in COCO format, metrics and pictures during training.

The model is a fake (see ``OneBoxPredictor``) so that these tests check the
wiring (split export, evaluation loop, flattening, pictures) in seconds; the
loop itself is tested in test_coco_eval.py and the real model in
test_inference.py.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from PIL import Image

from maskrcnn_jax import validation
from maskrcnn_jax.data import get_dataset_config


class OneBoxPredictor:
    """One detection per image: label 1, score 0.9, the top-left quarter as box and mask."""

    def __init__(self, variables=None, model_config=None):
        self.variables = variables
        self.model_config = model_config or ml_collections.ConfigDict(
            {"num_classes": 4, "class_names": ["__background__", "circle", "square", "triangle"]}
        )
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for image in images:
            h, w = image.shape[:2]
            masks = np.zeros((1, h, w), np.float32)
            masks[0, : h // 2, : w // 2] = 1.0
            out.append({
                "boxes": np.array([[0, 0, w / 2, h / 2]], np.float32),
                "scores": np.array([0.9], np.float32),
                "labels": np.array([1], np.int32),
                "masks": masks,
            })  # fmt: skip
        return out


def _shapes_config(max_images: int = 0) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = get_dataset_config("shapes")
    s = config.dataset.shapes
    s.num_val, s.image_size, s.max_size, s.seed = 3, 64, 30, 0
    config.eval_max_images = max_images
    return config


def test_validation_set_writes_shapes_once(tmp_path):
    config = _shapes_config()
    ann, images_dir = validation.validation_set(config, str(tmp_path))
    assert ann.startswith(str(tmp_path / "shapes_val"))
    with open(ann) as f:
        coco = json.load(f)
    assert len(coco["images"]) == 3 and coco["annotations"]
    assert all(os.path.isfile(os.path.join(images_dir, im["file_name"])) for im in coco["images"])
    mtime = os.path.getmtime(ann)
    assert validation.validation_set(config, str(tmp_path)) == (ann, images_dir)
    assert os.path.getmtime(ann) == mtime  # Reused, not rewritten.


def test_validation_set_of_coco_is_the_configured_files():
    config = ml_collections.ConfigDict({"dataset": get_dataset_config("coco")})
    config.dataset.val_annotations, config.dataset.val_images = "/a/val.json", "/a/val"
    assert validation.validation_set(config, "/unused") == ("/a/val.json", "/a/val")


def test_evaluate_during_training_flat_metrics_and_pictures(tmp_path, monkeypatch):
    made = []

    def predictor(variables, model_config):
        made.append(OneBoxPredictor(variables, model_config))
        return made[-1]

    monkeypatch.setattr(validation, "Predictor", predictor)
    model_config = OneBoxPredictor().model_config
    variables = {"params": {"w": np.zeros(2)}}
    metrics = validation.evaluate_during_training(
        _shapes_config(max_images=2), variables, model_config, str(tmp_path), step=7, pictures=2
    )
    (fake,) = made
    assert fake.variables is variables and fake.model_config is model_config
    assert metrics["eval_images"] == 2
    assert {f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "ARl")} <= set(metrics)
    assert all(v == -1.0 or 0.0 <= v <= 1.0 for k, v in metrics.items() if k != "eval_images")
    pictures = sorted(os.listdir(tmp_path / "pictures"))
    assert len(pictures) == 2 and all(p.endswith(".png") for p in pictures)
    # 64-pixel images are drawn 8x larger (512 // 64) so that labels are legible.
    assert Image.open(tmp_path / "pictures" / pictures[0]).size == (512, 512)


def test_draw_pictures_draws_the_first_images_by_id(tmp_path):
    ann, images_dir = validation.validation_set(_shapes_config(), str(tmp_path))
    fake = OneBoxPredictor()
    written = validation.draw_pictures(fake, ann, images_dir, str(tmp_path / "out"), 2)
    with open(ann) as f:
        first = sorted(json.load(f)["images"], key=lambda im: im["id"])[:2]
    assert [os.path.basename(p) for p in written] == [
        os.path.splitext(im["file_name"])[0] + ".png" for im in first
    ]
    assert fake.calls == [2]
    picture = np.asarray(Image.open(written[0]))
    assert picture.shape == (512, 512, 3)
    # The mask fill (top-left quarter) changes pixels; the far corner is untouched.
    original = np.asarray(Image.open(os.path.join(images_dir, first[0]["file_name"])))
    assert (picture[:200, :200] != np.repeat(np.repeat(original, 8, 0), 8, 1)[:200, :200]).any()
    np.testing.assert_array_equal(picture[-1, -1], original[-1, -1])


def test_no_pictures_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "Predictor", OneBoxPredictor)
    metrics = validation.evaluate_during_training(
        _shapes_config(max_images=1), {}, OneBoxPredictor().model_config, str(tmp_path), 1
    )
    assert metrics["eval_images"] == 1 and not (tmp_path / "pictures").exists()
