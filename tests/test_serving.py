"""serving: ExportedPredictor without the training stack; bad artifacts; CLIs with --exported."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from maskrcnn_jax import evaluate, export, predict, serving
from maskrcnn_jax.inference import Predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_TINY = os.path.join(ROOT, "tests", "data", "coco_tiny")
HEAVY = ("flax", "optax", "orbax", "tensorflow_datasets", "grain", "tensorflow")


def test_import_pulls_in_no_training_stack():
    code = (
        "import sys, maskrcnn_jax.serving\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(sorted(heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out
    # The check can fail: the Flax predictor does pull Flax in.
    code = code.replace("maskrcnn_jax.serving", "maskrcnn_jax.inference")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "flax" in out


@pytest.fixture(scope="module")
def artifact(tiny_model, tmp_path_factory):
    """The tiny model (4 classes, min 64, max 96) exported for CPU, one bucket."""
    config, variables = tiny_model
    out = str(tmp_path_factory.mktemp("artifact"))
    export.export_model(variables, config, out, platforms=("cpu",), buckets=[(96, 128)])
    return out


def _copy(artifact, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(artifact, out)
    return out


def _one_line_error(directory, file_name):
    with pytest.raises(serving.ExportError) as info:
        serving.ExportedPredictor(directory)
    message = str(info.value)
    assert "\n" not in message
    assert os.path.join(directory, file_name) in message or directory in message
    return message


def test_same_call_as_predictor(tiny_model, artifact):
    config, variables = tiny_model
    image = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    exported = serving.ExportedPredictor(artifact, mask_threshold=0.5)
    [got] = exported([image])
    [expected] = Predictor(variables, config, buckets=[(96, 128)], mask_threshold=0.5)([image])
    assert set(got) == {"boxes", "scores", "labels", "masks"}
    assert got["masks"].dtype == bool and got["masks"].shape[1:] == (70, 90)
    assert got["labels"].dtype == np.int64 and len(got["labels"]) > 0
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(got["masks"], expected["masks"])
    with pytest.raises(ValueError, match="image 0: expected dtype uint8"):
        exported([image.astype(np.float32)])


def test_missing_truncated_foreign_artifacts(artifact, tmp_path):
    assert "no such" in _one_line_error(str(tmp_path / "nothing"), "")
    bad = _copy(artifact, tmp_path)
    bucket = serving.bucket_file(96, 128)
    with open(os.path.join(bad, bucket), "r+b") as f:
        f.truncate(1000)
    assert "truncated" in _one_line_error(bad, bucket)
    shutil.rmtree(bad)
    bad = _copy(artifact, tmp_path)
    os.remove(os.path.join(bad, bucket))
    assert "missing" in _one_line_error(bad, bucket)
    shutil.rmtree(bad)
    bad = _copy(artifact, tmp_path)
    with open(os.path.join(bad, serving.PARAMS_FILE), "r+b") as f:
        f.truncate(100)
    assert "truncated" in _one_line_error(bad, serving.PARAMS_FILE)
    shutil.rmtree(bad)
    bad = _copy(artifact, tmp_path)
    with open(os.path.join(bad, serving.MANIFEST), "w") as f:
        json.dump({"format": "someone-else", "model": "yolo"}, f)
    assert "not a maskrcnn_jax export manifest" in _one_line_error(bad, serving.MANIFEST)
    with open(os.path.join(bad, serving.MANIFEST), "w") as f:
        f.write('{"format": "maskrcnn_jax.ex')
    assert "not a JSON manifest" in _one_line_error(bad, serving.MANIFEST)
    os.remove(os.path.join(bad, serving.MANIFEST))
    assert "missing" in _one_line_error(bad, serving.MANIFEST)


def test_platform_mismatch_names_both(tiny_model, tmp_path):
    config, variables = tiny_model
    out = str(tmp_path / "tpu_only")
    export.export_model(variables, config, out, platforms=("tpu",), buckets=[(96, 128)])
    message = _one_line_error(out, serving.MANIFEST)
    assert "tpu" in message and "runs on cpu" in message


def test_predict_and_evaluate_take_exported(artifact, tmp_path, capsys):
    image = os.path.join(COCO_TINY, "shapes_2.png")
    out_dir = str(tmp_path / "pred")
    assert predict.main(["--exported", artifact, "--output_dir", out_dir, image,
                         "--score_threshold", "0"]) == 0  # fmt: skip
    with open(os.path.join(out_dir, "predictions.json")) as f:
        assert all(r["image"] == image for r in json.load(f))
    metrics_file = str(tmp_path / "metrics.json")
    code = evaluate.main(["--exported", artifact, "--annotations",
                          os.path.join(COCO_TINY, "instances.json"), "--images", COCO_TINY,
                          "--max_images", "2", "--output", metrics_file])  # fmt: skip
    assert code == 0
    with open(metrics_file) as f:
        metrics = json.load(f)
    assert metrics["images"] == 2
    assert set(metrics["per_class"]) == {"circle", "square", "triangle"}
    capsys.readouterr()
    with pytest.raises(SystemExit):  # exactly one of --checkpoint / --exported
        evaluate.main(["--exported", artifact, "--checkpoint", artifact, "--annotations", "a",
                       "--images", "b"])  # fmt: skip
    assert "not allowed with" in capsys.readouterr().err
    annotations = os.path.join(COCO_TINY, "instances.json")
    code = evaluate.main(["--exported", str(tmp_path / "nope"), "--annotations", annotations,
                          "--images", COCO_TINY])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such exported-model directory" in err[0]
