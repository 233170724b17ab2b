"""torchvision weights -> our variables (torchvision_weights) and its CLI (convert).

The backbone's numerical parity with torchvision is tested with the model in
test_modeling.py (test_resnet18_backbone_matches_torchvision) and the whole
network's in test_parity.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import convert, torchvision_weights
from maskrcnn_jax.checkpoint import load_model
from maskrcnn_jax.inference import Predictor
from maskrcnn_jax.torchvision_weights import (
    config_from_state_dict,
    convert_torchvision_state_dict,
)


def _tiny_torchvision_maskrcnn():
    from torchvision.models.detection import MaskRCNN as TVMaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    return TVMaskRCNN(backbone, num_classes=3, min_size=64, max_size=96)


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory) -> str:
    """A torchvision ResNet-18 classification state dict on disk."""
    path = tmp_path_factory.mktemp("resnet18") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


def _assert_same_tree(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), a, b)


def test_converter_names_and_errors():
    state = {k: v.numpy() for k, v in _tiny_torchvision_maskrcnn().state_dict().items()}
    config = config_from_state_dict(state)
    assert (config.depth, config.num_classes, config.backbone_width) == (18, 3, 64)
    variables = convert_torchvision_state_dict(state, config)
    # Legacy key names (released COCO checkpoints) convert to the same variables.
    legacy = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(
                f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}."
            )
            key = key.replace(f"fpn.inner_blocks.{i}.0.", f"fpn.inner_blocks.{i}.")
            key = key.replace(f"fpn.layer_blocks.{i}.0.", f"fpn.layer_blocks.{i}.")
        legacy["module." + key] = value
    again = convert_torchvision_state_dict(legacy, config)
    jax.tree.map(np.testing.assert_array_equal, variables, again)
    with pytest.raises(ValueError, match="shape"):
        convert_torchvision_state_dict(state, config_from_state_dict(state, num_classes=5))
    with pytest.raises(ValueError, match="not converted"):
        convert_torchvision_state_dict(
            {**state, "roi_heads.keypoint_head.0.weight": np.zeros(3)}, config
        )
    with pytest.raises(ValueError, match="frozen_bn"):
        convert_torchvision_state_dict(state, config_from_state_dict(state, norm="gn"))


def test_backbone_config_from_classification_and_detection_weights(resnet18_pth):
    classification = torchvision_weights.load_torch_state_dict(resnet18_pth)
    config = torchvision_weights.backbone_config_from_state_dict(classification, num_classes=5)
    assert (config.depth, config.backbone_width, config.num_classes) == (18, 64, 5)
    detection = {k: v.numpy() for k, v in _tiny_torchvision_maskrcnn().state_dict().items()}
    assert torchvision_weights.backbone_config_from_state_dict(detection).depth == 18


def test_convert_cli_and_from_checkpoint(tmp_path):
    """torchvision .pth -> convert CLI -> checkpoint -> Predictor, same as direct conversion."""
    tv = _tiny_torchvision_maskrcnn()
    torch.save(tv.state_dict(), tmp_path / "model.pth")
    assert (
        convert.main(
            [
                "--from",
                "torchvision",
                "--input",
                str(tmp_path / "model.pth"),
                "--output",
                str(tmp_path / "ckpt"),
            ]
        )
        == 0
    )
    predictor = Predictor.from_checkpoint(str(tmp_path / "ckpt"))
    assert predictor.config.num_classes == 3 and predictor.config.min_size == 800
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    direct = convert.convert_torchvision_state_dict(state, convert.config_from_state_dict(state))
    _assert_same_tree(predictor.variables, direct)


@pytest.mark.parametrize(
    "flags",
    [["--backbone_only", "--num_classes", "5"], ["--backbone-only", "--num-classes", "5"]],
    ids=["underscores", "dashed_aliases"],
)
def test_convert_cli_backbone_only(tmp_path, resnet18_pth, flags):
    """A torchvision ResNet classification .pth -> backbone-only checkpoint."""
    args = ["--input", resnet18_pth, "--output", str(tmp_path / "ckpt")]
    assert convert.main([*args, *flags]) == 0
    variables, config = load_model(str(tmp_path / "ckpt"))
    assert (config.depth, config.num_classes) == (18, 5)
    assert set(variables["params"]) == {"backbone"} and set(variables["constants"]) == {"backbone"}
    direct = convert.load_torchvision_backbone(resnet18_pth, config)
    _assert_same_tree(variables, direct)


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.pth")
    assert convert.main(["--input", missing, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and len(err.splitlines()) == 1
    torch.save(_tiny_torchvision_maskrcnn().state_dict(), tmp_path / "model.pth")
    code = convert.main(["--input", str(tmp_path / "model.pth"), "--output",
                         str(tmp_path / "out"), "--num_classes", "5"])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err == "error: --num_classes 5 but the weights have 3 classes\n"
    assert not (tmp_path / "out").exists()


def test_convert_help_shows_underscore_flags_only(capsys):
    with pytest.raises(SystemExit) as e:
        convert.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--backbone_only" in out and "--num_classes NUM_CLASSES" in out
    assert "--backbone-only" not in out and "--num-classes NUM" not in out
    assert "dashed spellings" in out
