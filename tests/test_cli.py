"""image_io, visualize, predict and evaluate: bad inputs, outputs, and the CLIs' exit paths.

The model is a fake with the ``inference.Predictor`` call signature that returns
the fixture's ground truth, so these tests run in about a second; the
end-to-end test with a real random-weight checkpoint is at the bottom.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn_jax import coco_eval, evaluate, image_io, predict, visualize

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "coco_tiny")
ANNOTATIONS = os.path.join(FIXTURE, "instances.json")


class FakePredictor:
    """Returns, for each image of the fixture (found by its size), its ground truth.

    Labels are contiguous (category ids 1, 3, 7 -> labels 1, 2, 3) and the
    config has no ``category_ids``, so evaluation must map them through the file.
    Mask probabilities are 0.9 inside the object, 0.2 outside.
    """

    def __init__(self, score=0.95):
        self.model_config = ml_collections.ConfigDict({"num_classes": 4})
        self.calls = []
        coco = coco_eval.load_coco(ANNOTATIONS)
        label_of = {cid: k + 1 for k, cid in enumerate(sorted(coco.getCatIds()))}
        self.by_size = {}
        for info in coco.dataset["images"]:
            anns = [a for a in coco.imgToAnns[info["id"]] if not a["iscrowd"]]
            boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            masks = np.array([coco.annToMask(a) for a in anns], np.float32)
            self.by_size[(info["height"], info["width"])] = {
                "boxes": boxes,
                "scores": np.full((len(anns),), score, np.float32),
                "labels": np.array([label_of[a["category_id"]] for a in anns], np.int32),
                "masks": (0.2 + 0.7 * masks).reshape(len(anns), info["height"], info["width"]),
            }

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for image in images:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            out.append(dict(self.by_size[image.shape[:2]]))
        return out


@pytest.fixture
def fake_inference(monkeypatch):
    """Makes ``Predictor.from_checkpoint`` return a FakePredictor (or raise, for a bad path)."""
    from maskrcnn_jax.checkpoint import CheckpointError

    def from_checkpoint(path, **kwargs):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        return FakePredictor()

    module = types.ModuleType("maskrcnn_jax.inference")
    module.Predictor = types.SimpleNamespace(from_checkpoint=from_checkpoint)
    monkeypatch.setitem(sys.modules, "maskrcnn_jax.inference", module)


def write_truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(path, quality=90)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# ---------------------------------------------------------------------------
# image_io
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("missing.png", None, "no such file"),
        ("notes.jpg", lambda p: Path(p).write_text("not an image"), "not an image"),
        ("empty.png", lambda p: Path(p).write_bytes(b""), "not an image"),
        ("cut.jpg", write_truncated_jpeg, "truncated"),
    ],
)
def test_load_image_errors_name_the_file_on_one_line(tmp_path, name, make, reason):
    path = tmp_path / name
    if make:
        make(str(path))
    with pytest.raises(image_io.ImageError) as e:
        image_io.load_image(path)
    message = str(e.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message
    assert isinstance(e.value, ValueError)


def test_load_image_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), np.uint8)
    cases = {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((6, 5), 9, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "grey16.png": Image.fromarray((np.arange(30).reshape(6, 5) * 2000).astype(np.uint16)),
        "la.png": Image.fromarray(rgb[..., 0]).convert("LA"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    out = {name: image_io.load_image(tmp_path / name) for name in cases}
    for name, array in out.items():
        assert array.shape == (6, 5, 3) and array.dtype == np.uint8, name
    np.testing.assert_array_equal(out["grey.png"], np.repeat(rgb[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(out["rgba.png"], rgb)  # Alpha dropped, colour kept.
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    expected16 = np.round(np.arange(30).reshape(6, 5) * 2000 * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out["grey16.png"][..., 1], expected16)


def test_load_image_exif_orientation(tmp_path):
    image = Image.new("RGB", (4, 2))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = image_io.load_image(tmp_path / "rotated.png")
    stored = image_io.load_image(tmp_path / "rotated.png", exif_transpose=False)
    assert stored.shape == (2, 4, 3) and upright.shape == (4, 2, 3)
    assert tuple(upright[0, 1]) == (255, 0, 0)


def test_list_images_expands_directories(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    listed = image_io.list_images([str(tmp_path), "x.gif"])
    assert listed == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), "x.gif"]


# ---------------------------------------------------------------------------
# visualize
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------


def test_run_prediction_writes_pictures_and_rles(tmp_path):
    paths = [os.path.join(FIXTURE, n) for n in ("shapes_1.png", "shapes_2.png", "empty.png")]
    predictor = FakePredictor()
    report = predict.run_prediction(
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
    names = predict._picture_names(["a/x.png", "b/x.jpg", "y.jpeg", "c/x.png"])
    assert names == ["x.png", "x_2.png", "y.png", "x_3.png"]


def test_run_prediction_threshold_applies_to_json(tmp_path):
    report = predict.run_prediction(
        FakePredictor(score=0.4),
        [os.path.join(FIXTURE, "shapes_1.png")],
        str(tmp_path),
        score_threshold=0.5,
    )
    assert report.num_detections == 0
    assert json.loads(Path(tmp_path / "predictions.json").read_text()) == []


def test_predict_cli_reports_bad_image_and_goes_on(tmp_path, capsys, fake_inference):
    bad = tmp_path / "shapes_1.png"  # Same stem as a good image, but never drawn.
    write_truncated_jpeg(str(bad))
    good = [os.path.join(FIXTURE, "shapes_1.png"), os.path.join(FIXTURE, "shapes_3.png")]
    out = tmp_path / "out"
    code = predict.main(
        ["--checkpoint", str(tmp_path), "--output-dir", str(out), good[0], str(bad),
         str(tmp_path / "missing.png"), good[1]]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in err
    assert str(bad) in lines[0] and "truncated" in lines[0]
    assert "missing.png: no such file" in lines[1]
    assert sorted(os.listdir(out)) == ["predictions.json", "shapes_1.png", "shapes_3.png"]
    results = json.loads(Path(out / "predictions.json").read_text())
    assert {r["image"] for r in results} == set(good)


def test_predict_cli_bad_checkpoint_and_class_names(tmp_path, capsys, fake_inference):
    image = os.path.join(FIXTURE, "shapes_1.png")
    code = predict.main(["--checkpoint", str(tmp_path / "nope"), "--output-dir", str(tmp_path),
                         image])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope" in err and "Traceback" not in err
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    code = predict.main(["--checkpoint", str(tmp_path), "--output-dir", str(tmp_path),
                         "--class-names", str(names), image])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "names.txt: 2 class names" in err and len(err.splitlines()) == 1
    names.write_text("circle\nsquare\ntriangle\n")
    assert predict.read_class_names(str(names), 4) == ["__background__", "circle", "square",
                                                       "triangle"]  # fmt: skip


def test_default_class_names():
    assert predict.default_class_names({"num_classes": 91})[1] == "person"
    assert predict.default_class_names({"num_classes": 4}) is None
    config = {"num_classes": 3, "class_names": ["a", "b"]}
    assert predict.default_class_names(config) == ["__background__", "a", "b"]


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def test_run_evaluation_ground_truth_scores_one():
    lines = []
    metrics = evaluate.run_evaluation(
        FakePredictor(), ANNOTATIONS, FIXTURE, batch_size=3, verbose=True, log=lines.append
    )
    assert metrics["images"] == 4 and metrics["skipped"] == 0 and not lines
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["APl"] == pytest.approx(1.0)


def test_run_evaluation_max_images_and_no_detections():
    metrics = evaluate.run_evaluation(FakePredictor(score=0.01), ANNOTATIONS, FIXTURE,
                                      max_images=2, score_threshold=0.5)  # fmt: skip
    assert metrics["images"] == 2
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AR100"] == 0.0


def test_evaluate_cli_skips_corrupt_images(tmp_path, capsys, fake_inference):
    images = tmp_path / "images"
    shutil.copytree(FIXTURE, images)
    write_truncated_jpeg(str(images / "shapes_2.png"))  # Corrupt.
    os.remove(images / "shapes_3.png")  # Missing.
    out = tmp_path / "metrics.json"
    code = evaluate.main(["--checkpoint", str(tmp_path), "--annotations", ANNOTATIONS,
                          "--images", str(images), "--output", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2
    assert "shapes_2.png" in skipped[0] and "shapes_3.png: no such file" in skipped[1]
    assert "IoU metric: bbox" in captured.out and "IoU metric: segm" in captured.out
    metrics = json.loads(Path(out).read_text())
    assert set(metrics) == {"bbox", "segm", "images", "skipped"}
    assert metrics["images"] == 2 and metrics["skipped"] == 2
    assert list(metrics["segm"]) == list(coco_eval.STAT_NAMES)
    # The two images read are evaluated alone: their ground truth is all found.
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_evaluate_skips_image_of_the_wrong_size(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(FIXTURE, images)
    Image.new("RGB", (10, 10)).save(images / "shapes_1.png")
    lines = []
    metrics = evaluate.run_evaluation(FakePredictor(), ANNOTATIONS, str(images), log=lines.append)
    assert metrics["skipped"] == 1 and "size 10x10 differs" in lines[0]


def test_evaluate_cli_bad_annotations(tmp_path, capsys, fake_inference):
    code = evaluate.main(["--checkpoint", str(tmp_path), "--annotations",
                          str(tmp_path / "none.json"), "--images", FIXTURE])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {tmp_path / 'none.json'}: no such annotation file\n"


def test_mask_rles_of_results_file_decode(tmp_path):
    """--predictions writes the COCO results evaluated, with str RLE counts."""
    path = tmp_path / "results.json"
    evaluate.run_evaluation(FakePredictor(), ANNOTATIONS, FIXTURE, results_file=str(path))
    results = json.loads(Path(path).read_text())
    assert {r["category_id"] for r in results} == {1, 3, 7}
    assert mask_util.decode(results[0]["segmentation"]).any()


# ---------------------------------------------------------------------------
# End to end: a real random-weight checkpoint (one init, one Predictor shared).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint dir, Predictor loaded from it) of a tiny random 4-class model."""
    import jax

    from maskrcnn_jax import checkpoint, inference
    from maskrcnn_jax.modeling import get_model_config, init_model

    config = get_model_config(
        num_classes=4, depth=18, backbone_width=16, fpn_channels=32, min_size=128,
        max_size=160, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=64,
        detections_per_img=16, box_candidates=128, representation_size=32, mask_head_dim=16,
    )  # fmt: skip
    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    checkpoint.save_model(path, init_model(config, jax.random.key(0)), config)
    return path, inference.Predictor.from_checkpoint(path)


@pytest.fixture
def shared_predictor(monkeypatch, tiny_checkpoint):
    """``Predictor.from_checkpoint`` of the tiny checkpoint returns the already compiled one."""
    from maskrcnn_jax import inference

    path, predictor = tiny_checkpoint

    def from_checkpoint(p, **kwargs):
        assert os.path.samefile(p, path)
        return predictor

    monkeypatch.setattr(inference.Predictor, "from_checkpoint", staticmethod(from_checkpoint))
    return path, predictor


def test_end_to_end_predict(tmp_path, capsys, shared_predictor):
    path, predictor = shared_predictor
    bad = tmp_path / "bad.jpg"
    write_truncated_jpeg(str(bad))
    # shapes_1 (120x160) and empty (40x48) resize into the same bucket: one compilation.
    images = [os.path.join(FIXTURE, "shapes_1.png"), str(bad), os.path.join(FIXTURE, "empty.png")]
    out = tmp_path / "out"
    code = predict.main(
        ["--checkpoint", path, "--output-dir", str(out), "--score-threshold", "0.1", *images]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {bad}: corrupt or truncated image (image file is truncated")
    assert sorted(os.listdir(out)) == ["empty.png", "predictions.json", "shapes_1.png"]
    results = json.loads((out / "predictions.json").read_text())
    image = image_io.load_image(images[0])
    (expected,) = predictor([image])
    keep = expected["scores"] >= 0.1
    mine = [r for r in results if r["image"] == images[0]]
    assert 0 < len(mine) == keep.sum()
    decoded = coco_eval.decode_masks([r["segmentation"] for r in mine])
    np.testing.assert_array_equal(decoded, expected["masks"][keep] > 0.5)
    np.testing.assert_allclose([r["score"] for r in mine], expected["scores"][keep], atol=1e-5)
    assert {r["category_id"] for r in mine} <= {1, 2, 3}


def test_end_to_end_evaluate(tmp_path, capsys, shared_predictor):
    path, _ = shared_predictor
    out = tmp_path / "metrics.json"
    code = evaluate.main(["--checkpoint", path, "--annotations", ANNOTATIONS, "--images", FIXTURE,
                          "--output", str(out), "--max-images", "2"])  # fmt: skip
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 2 and metrics["skipped"] == 0
    for iou_type in ("bbox", "segm"):
        assert list(metrics[iou_type]) == list(coco_eval.STAT_NAMES)
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics[iou_type].values())
    assert "IoU metric: segm" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["predict", "evaluate"])
def test_cli_subprocess_bad_checkpoint_is_one_line(tmp_path, module):
    image = os.path.join(FIXTURE, "empty.png")
    args = {
        "predict": ["--output-dir", str(tmp_path), image],
        "evaluate": ["--annotations", ANNOTATIONS, "--images", FIXTURE],
    }[module]
    missing = str(tmp_path / "no_checkpoint")
    proc = subprocess.run(
        [sys.executable, "-m", f"maskrcnn_jax.{module}", "--checkpoint", missing, *args],
        check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {missing}: no such checkpoint directory\n"
