"""experiments/ablations.py: run order, per-variant configs, the report, one tiny end-to-end run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import ablations, shapes, tiny
from maskrcnn_jax.modeling.mask_rcnn import mask_mode

TINY = os.path.join(os.path.dirname(ablations.__file__), "tiny.py")


def test_runs_repeat_only_align_and_pool_with_the_other_seeds():
    assert ablations.runs(["align", "softmax", "pool"], [0, 7]) == [
        ("align", 0),
        ("softmax", 0),
        ("pool", 0),
        ("align", 7),
        ("pool", 7),
    ]
    assert ablations.runs(["class_agnostic"], [3, 4]) == [("class_agnostic", 3)]


@pytest.mark.parametrize("variant", list(ablations.VARIANTS))
def test_variant_config_changes_only_its_setting_seed_and_budget(variant, tmp_path):
    base = shapes.get_config()
    config = ablations.variant_config(base, variant, 5, 250, str(tmp_path))
    expected = {"roi_pooler": "align", "mask_loss": "sigmoid", "class_agnostic_mask": False}
    expected.update(ablations.VARIANTS[variant])
    assert {k: config.model[k] for k in expected} == expected
    other = {k: v for k, v in config.model.items() if k not in expected}
    assert other == {k: v for k, v in base.model.items() if k not in expected}
    assert (config.seed, config.train.steps) == (5, 250)
    # The schedule keeps its shape: 500 steps with warm-up 100, decay (380, 470) -> halves.
    assert config.train.warmup_steps == base.train.warmup_steps // 2
    assert tuple(config.train.decay_steps) == tuple(s // 2 for s in base.train.decay_steps)
    assert config.dataset.data_dir == str(tmp_path)
    assert config.eval_at_end and not config.num_pictures
    assert mask_mode(config.model) == (
        "class_agnostic" if variant == "class_agnostic" else config.model.mask_loss
    )


def _rows():
    return [
        {"variant": v, "seed": s, "steps": 9, "seconds": 12.3, "cpu": "Test CPU, 2 cores",
         "segm_AP": ap, "segm_AP50": ap + 0.2, "segm_AP75": ap / 2, "bbox_AP": ap + 0.05}
        for (v, s), ap in zip(
            [("align", 0), ("pool", 0), ("softmax", 0), ("align", 1)], (0.512, 0.25, 0.1, 0.5)
        )
    ]  # fmt: skip


def test_report_table_and_chart(tmp_path):
    rows = _rows()
    table, chart = tmp_path / "ablations.md", tmp_path / "ablations.png"
    ablations.write_table(rows, str(table), TINY)
    ablations.draw_chart(rows, str(chart))
    text = table.read_text().splitlines()
    body = [line for line in text if line.startswith("| align") or line.startswith("| pool")]
    assert body[0] == "| align | 0 | 51.2 | 71.2 | 25.6 | 56.2 | 12 | 9 | Test CPU, 2 cores |"
    assert body[1].startswith("| pool | 0 | 25.0 | 45.0 | 12.5 | 30.0 |")
    assert any(line.startswith("| RoIPool, stride 16") and "26.9" in line for line in text)
    image = np.asarray(Image.open(chart).convert("L"))
    # One coloured bar per run, tallest for the best AP: count dark columns at the bar base.
    base_row = image[40 + 300 - 2]
    assert (base_row < 250).sum() >= len(rows) * 30


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    for flags in (
        ["--variants", "align,roialign"],
        ["--seeds", "0,x"],
        ["--config", str(tmp_path / "missing.py")],
        ["--steps", "-3"],
    ):
        assert ablations.main(["--workdir", str(tmp_path / "w"), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()  # refused before anything ran


def test_tiny_end_to_end_run_and_resume(tmp_path, capsys):
    """One variant on the tiny config: trains, evaluates with pycocotools, writes the report."""
    work = tmp_path / "abl"
    argv = ["--workdir", str(work), "--config", TINY, "--steps", "2", "--variants", "pool",
            "--seeds", "0"]  # fmt: skip
    assert ablations.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((work / "pool_seed0" / "result.json").read_text())
    assert (result["variant"], result["seed"], result["steps"]) == ("pool", 0, 2)
    for k in ablations.METRICS:
        assert 0.0 <= result[k] <= 1.0 or result[k] == -1.0, (k, result[k])  # -1: COCO "no data"
    assert f"| pool | 0 | {100 * result['segm_AP']:.1f} |" in out
    assert (work / "ablations.md").exists() and Image.open(work / "ablations.png").size[0] > 0
    assert tiny.get_config().train.steps != 2  # the flag, not the config, set the budget
    # A rerun reuses the finished run (same budget) instead of training again.
    mtime = os.path.getmtime(work / "pool_seed0" / "result.json")
    assert ablations.main(argv) == 0
    assert os.path.getmtime(work / "pool_seed0" / "result.json") == mtime
