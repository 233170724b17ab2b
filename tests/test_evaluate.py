"""The evaluate CLI: flags and their aliases, exit paths, and an end-to-end run.

The evaluation loop itself (coco_eval.run_evaluation) is tested in test_coco_eval.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskrcnn_jax import coco_eval, evaluate
from tests.cli_fixtures import ANNOTATIONS, FIXTURE, write_truncated_jpeg
from tests.cli_fixtures import fake_inference, shared_predictor, tiny_checkpoint  # noqa: F401


def test_evaluate_cli_skips_corrupt_images(tmp_path, capsys, fake_inference):
    """Also a full run (the flags here have no dashed form; see the spelling test)."""
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
    assert set(metrics) == {"bbox", "segm", "per_class", "images", "skipped"}
    assert metrics["images"] == 2 and metrics["skipped"] == 2
    assert list(metrics["segm"]) == list(coco_eval.STAT_NAMES)
    # The two images read are evaluated alone: their ground truth is all found.
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_evaluate_cli_bad_annotations(tmp_path, capsys, fake_inference):
    code = evaluate.main(["--checkpoint", str(tmp_path), "--annotations",
                          str(tmp_path / "none.json"), "--images", FIXTURE])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {tmp_path / 'none.json'}: no such annotation file\n"


@pytest.mark.parametrize(
    "spelling",
    [
        ["--max_images", "3", "--batch_size", "2", "--score_threshold", "0.3"],
        ["--max-images", "3", "--batch-size", "2", "--score-threshold", "0.3"],
        ["--max", "3", "--batch", "2", "--score", "0.3"],
    ],
    ids=["underscores", "dashed_aliases", "abbreviations"],
)
def test_evaluate_flag_spellings_are_equivalent(spelling):
    args = evaluate.parse_args(["--checkpoint", "c", "--annotations", "a.json", "--images", "i",
                                *spelling])  # fmt: skip
    assert vars(args) == {"checkpoint": "c", "annotations": "a.json", "images": "i",
                          "output": None, "max_images": 3, "batch_size": 2,
                          "score_threshold": 0.3, "predictions": None, "exported": None}  # fmt: skip


def test_evaluate_flag_errors_use_underscores(capsys):
    base = ["--checkpoint", "c", "--annotations", "a.json", "--images", "i"]
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args([*base, "--max-images", "0"])
    assert e.value.code == 2 and "--max_images must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--max_images MAX_IMAGES" in out and "--max-images" not in out


def test_end_to_end_evaluate(tmp_path, capsys, shared_predictor):
    """A real checkpoint; --max-images, the dashed alias of --max_images, still works."""
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


def test_cli_subprocess_bad_checkpoint_is_one_line(tmp_path):
    missing = str(tmp_path / "no_checkpoint")
    proc = subprocess.run(
        [sys.executable, "-m", "maskrcnn_jax.evaluate", "--checkpoint", missing,
         "--annotations", ANNOTATIONS, "--images", FIXTURE],
        check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {missing}: no such checkpoint directory\n"
