"""``experiments/bench_trained_step.py``: its variants and its one-line errors.

Nothing is compiled or timed here: every case stops before the checkpoint is read.
"""

from __future__ import annotations

import pathlib

import pytest

from experiments import bench_trained_step
from experiments.tiny import get_config

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")


def test_override_sets_typed_model_fields():
    config = bench_trained_step._override(get_config(), "mask_head_prefixes=1,box_nms_thresh=0.6")
    assert config.model.mask_head_prefixes == 1
    assert config.model.box_nms_thresh == 0.6
    untouched = bench_trained_step._override(get_config(), "")
    assert untouched.model.to_dict() == get_config().model.to_dict()


@pytest.mark.parametrize(
    "variant, message",
    [
        ("no_such_field=1", "unknown model config field 'no_such_field'"),
        ("mask_head_dim=abc", "mask_head_dim='abc' is not a Python literal"),
        ("mask_head_dim='wide'", "mask_head_dim=\"'wide'\":"),
    ],
)
def test_bad_variant_is_one_line(variant, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", TINY, variant])
    text = str(exc.value)
    assert text.startswith(f"error: variant {variant!r}: ") and message in text
    assert "\n" not in text


def test_workdir_without_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", TINY])
    assert str(exc.value) == (
        f"error: --workdir {tmp_path}: no train checkpoint in {tmp_path / 'checkpoints'}"
    )


def test_missing_config_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", str(tmp_path / "x.py")])
    assert str(exc.value) == f"error: --config {tmp_path / 'x.py'}: no such file"
