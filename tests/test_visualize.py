"""visualize: pictures of predictions, and run_prediction (image files -> pictures + JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from maskrcnn_jax import coco_eval, image_io, visualize
from tests.cli_fixtures import FIXTURE, FakePredictor


def test_draw_predictions_paints_masks_boxes_and_labels():
    image = np.full((60, 80, 3), 128, np.uint8)
    masks = np.zeros((2, 60, 80), np.float32)
    masks[0, 10:30, 10:40] = 0.8
    masks[1, 40:50, 60:70] = 0.9
    prediction = {
        "boxes": np.array([[10, 10, 40, 30], [60, 40, 70, 50]], np.float32),
        "scores": np.array([0.9, 0.3], np.float32),
        "labels": np.array([1, 2]),
        "masks": masks,
    }
    out = np.asarray(visualize.draw_predictions(image, prediction, ["bg", "cat", "dog"], 0.5))
    assert out.shape == image.shape
    assert (out[20, 25] != 128).any()  # Mask fill.
    np.testing.assert_array_equal(out[45, 65], [128, 128, 128])  # Below the threshold.
    np.testing.assert_array_equal(out[55:, :50], image[55:, :50])  # Untouched.
    nothing = {k: v[:0] for k, v in prediction.items()}
    np.testing.assert_array_equal(np.asarray(visualize.draw_predictions(image, nothing)), image)
    assert visualize.label_name(2, ["bg", "cat", "dog"]) == "dog"
    assert visualize.label_name(7, ["bg"]) == "7"


def test_run_prediction_writes_pictures_and_rles(tmp_path):
    paths = [os.path.join(FIXTURE, n) for n in ("shapes_1.png", "shapes_2.png", "empty.png")]
    predictor = FakePredictor()
    report = visualize.run_prediction(
        predictor,
        paths,
        str(tmp_path / "out"),
        class_names=["bg", "circle", "square", "tri"],
        batch_size=2,
    )
    assert predictor.calls == [2, 1] and not report.failed
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        picture = Image.open(tmp_path / "out" / f"{stem}.png")
        assert picture.size == Image.open(path).size
    with open(tmp_path / "out" / "predictions.json") as f:
        results = json.load(f)
    assert report.num_detections == len(results) == 7
    for path in paths[:2]:
        expected = predictor.by_size[image_io.load_image(path).shape[:2]]
        mine = [r for r in results if r["image"] == path]
        assert len(mine) == len(expected["boxes"])
        assert all(isinstance(r["segmentation"]["counts"], str) for r in mine)
        decoded = coco_eval.decode_masks([r["segmentation"] for r in mine])
        np.testing.assert_array_equal(decoded, expected["masks"] > 0.5)
        boxes = np.array([r["bbox"] for r in mine])
        np.testing.assert_allclose(boxes[:, 2:] + boxes[:, :2], expected["boxes"][:, 2:], atol=1e-3)
        # No category_ids given: labels are written as they are.
        assert [r["category_id"] for r in mine] == expected["labels"].tolist()


def test_picture_names_do_not_collide():
    names = visualize.picture_names(["a/x.png", "b/x.jpg", "y.jpeg", "c/x.png"])
    assert names == ["x.png", "x_2.png", "y.png", "x_3.png"]


def test_run_prediction_threshold_applies_to_json(tmp_path):
    report = visualize.run_prediction(
        FakePredictor(score=0.4),
        [os.path.join(FIXTURE, "shapes_1.png")],
        str(tmp_path),
        score_threshold=0.5,
    )
    assert report.num_detections == 0
    assert json.loads(Path(tmp_path / "predictions.json").read_text()) == []


def test_run_prediction_reports_unreadable_images_and_goes_on(tmp_path):
    lines = []
    missing = str(tmp_path / "missing.png")
    good = os.path.join(FIXTURE, "shapes_1.png")
    report = visualize.run_prediction(FakePredictor(), [missing, good], str(tmp_path / "out"),
                                      batch_size=2, log=lines.append)  # fmt: skip
    assert report.failed == [(missing, f"{missing}: no such file")]
    assert lines == [f"error: {missing}: no such file"]
    assert list(report.pictures) == [good] and os.path.isfile(report.pictures[good])
