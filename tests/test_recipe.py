"""Start-up checks of a recipe: each mistake is one line, before data or compilation."""

from __future__ import annotations

import os
import sys

import pytest

from experiments import coco_r50_fpn_1x, coco_r50_fpn_lsj, shapes, tiny
from maskrcnn_jax import train
from maskrcnn_jax.recipe import validate_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_error(config, num_devices=1) -> str:
    with pytest.raises(ValueError) as e:
        validate_recipe(config, num_devices)
    message = str(e.value)
    assert "\n" not in message
    return message


def _coco_with_weights():
    """The COCO recipe with a backbone checkpoint named: its frozen-BN guard passes."""
    config = coco_r50_fpn_1x.get_config()
    config.init.backbone_checkpoint = "/some/weights"
    return config


def test_frozen_backbone_without_weights_is_refused():
    config = coco_r50_fpn_1x.get_config()
    assert config.model.norm == "frozen_bn"
    message = _one_line_error(config)
    for name in ("init.backbone_checkpoint", "init.checkpoint", "norm='gn'", "from_scratch"):
        assert name in message, name


@pytest.mark.parametrize(
    "field", ["backbone_checkpoint", "checkpoint", "from_scratch"], ids=lambda f: f
)
def test_frozen_backbone_allowed_with_weights_or_on_purpose(field):
    config = coco_r50_fpn_1x.get_config()
    config.init[field] = True if field == "from_scratch" else "/some/weights"
    validate_recipe(config, 1)


@pytest.mark.parametrize("module", [shapes, tiny, coco_r50_fpn_lsj])
def test_groupnorm_configs_need_no_weights(module):
    config = module.get_config()
    assert config.model.norm == "gn" and not config.init.backbone_checkpoint
    validate_recipe(config, 8)


def test_batch_not_divisible_by_devices():
    config = tiny.get_config()
    config.train.batch_size = 12
    message = _one_line_error(config, num_devices=8)
    assert "train.batch_size=12" in message and "8 devices" in message
    validate_recipe(config, 4)


def test_canvas_smaller_than_max_size():
    config = _coco_with_weights()
    assert config.dataset.aspect_canvases == ((800, 1344), (1344, 800))
    validate_recipe(config, 1)
    config.dataset.aspect_canvases = ()  # One canvas: dataset.image_size.
    config.dataset.image_size = (1024, 1024)
    message = _one_line_error(config)
    assert "dataset.image_size=(1024, 1024)" in message and "dataset.max_size=1333" in message
    config.dataset.lsj.enabled = True  # LSJ crops to the canvas: max_size is not used
    validate_recipe(config, 1)


def test_aspect_canvas_that_cannot_hold_its_orientation():
    config = _coco_with_weights()
    config.dataset.aspect_canvases = ((800, 1344), (1312, 800))
    message = _one_line_error(config)
    assert "portrait canvas (1312, 800)" in message and "up to 1333x800" in message
    assert "dataset.max_size=1333" in message
    config.dataset.aspect_canvases = ((768, 1344), (1344, 800))  # Shorter side 800 > 768.
    assert "landscape canvas (768, 1344)" in _one_line_error(config)
    config.dataset.scales = (640, 672, 704, 736, 768)
    validate_recipe(config, 1)


def test_canvas_sides_must_be_multiples_of_the_p5_stride():
    config = _coco_with_weights()
    config.dataset.aspect_canvases = ((800, 1340), (1344, 800))
    message = _one_line_error(config)
    assert "dataset.aspect_canvases canvas (800, 1340)" in message and "multiples of 32" in message
    config.dataset.aspect_canvases = ()
    config.dataset.image_size = (1344, 1350)
    assert "dataset.image_size canvas (1344, 1350)" in _one_line_error(config)


def test_trainer_refuses_before_preparing_data(tmp_path):
    """The guard fires before the work dir, the data or a compilation exist."""
    config = coco_r50_fpn_1x.get_config()
    config.dataset.train_annotations = str(tmp_path / "missing.json")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="init.backbone_checkpoint"):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_cli_prints_one_line(tmp_path, capsys, monkeypatch):
    argv = [
        "train",
        "--config",
        os.path.join(ROOT, "experiments", "coco_r50_fpn_1x.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.train.batch_size=8",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model.norm='frozen_bn'") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
