"""The predict CLI: flags and their aliases, exit paths, and an end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskrcnn_jax import class_names, coco_eval, image_io, predict
from tests.cli_fixtures import FIXTURE, write_truncated_jpeg
from tests.cli_fixtures import fake_inference, shared_predictor, tiny_checkpoint  # noqa: F401


def test_predict_cli_reports_bad_image_and_goes_on(tmp_path, capsys, fake_inference):
    """Also a full run with the dashed spelling of --output_dir (an alias)."""
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
    code = predict.main(["--checkpoint", str(tmp_path / "nope"), "--output_dir", str(tmp_path),
                         image])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope" in err and "Traceback" not in err
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    code = predict.main(["--checkpoint", str(tmp_path), "--output_dir", str(tmp_path),
                         "--class_names", str(names), image])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "names.txt: 2 class names" in err and len(err.splitlines()) == 1
    names.write_text("circle\nsquare\ntriangle\n")
    assert class_names.read_class_names(str(names), 4) == ["__background__", "circle", "square",
                                                       "triangle"]  # fmt: skip


@pytest.mark.parametrize(
    "spelling",
    [
        ["--output_dir", "o", "--score_threshold", "0.3", "--class_names", "n.txt",
         "--batch_size", "2"],
        ["--output-dir", "o", "--score-threshold", "0.3", "--class-names", "n.txt",
         "--batch-size", "2"],
        ["--output", "o", "--score", "0.3", "--class", "n.txt", "--batch", "2"],
    ],
    ids=["underscores", "dashed_aliases", "abbreviations"],
)  # fmt: skip
def test_predict_flag_spellings_are_equivalent(spelling):
    args = predict.parse_args(["--checkpoint", "c", *spelling, "a.png"])
    assert vars(args) == {"checkpoint": "c", "output_dir": "o", "score_threshold": 0.3,
                          "class_names": "n.txt", "batch_size": 2, "images": ["a.png"],
                          "exported": None}  # fmt: skip


def test_predict_help_and_errors_use_underscores(capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--output_dir OUTPUT_DIR" in out and "--batch_size BATCH_SIZE" in out
    assert "--output-dir" not in out and "--batch-size BATCH_SIZE" not in out
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--checkpoint", "c", "--output_dir", "o", "--batch-size", "0", "a"])
    assert e.value.code == 2 and "--batch_size must be >= 1" in capsys.readouterr().err


def test_end_to_end_predict(tmp_path, capsys, shared_predictor):
    path, predictor = shared_predictor
    bad = tmp_path / "bad.jpg"
    write_truncated_jpeg(str(bad))
    # shapes_1 (120x160) and empty (40x48) resize into the same bucket: one compilation.
    images = [os.path.join(FIXTURE, "shapes_1.png"), str(bad), os.path.join(FIXTURE, "empty.png")]
    out = tmp_path / "out"
    code = predict.main(
        ["--checkpoint", path, "--output_dir", str(out), "--score_threshold", "0.1", *images]
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


def test_cli_subprocess_bad_checkpoint_is_one_line(tmp_path):
    image = os.path.join(FIXTURE, "empty.png")
    missing = str(tmp_path / "no_checkpoint")
    proc = subprocess.run(
        [sys.executable, "-m", "maskrcnn_jax.predict", "--checkpoint", missing,
         "--output_dir", str(tmp_path), image],
        check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {missing}: no such checkpoint directory\n"
