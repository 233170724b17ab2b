"""The README's custom-data example end to end, on tests/data/coco_tiny.

convert (torchvision weights) -> train (fine-tune with another class count)
-> evaluate -> predict, through the same command-line entry points and the
same experiment config (``experiments/coco_r50_fpn_1x.py``) the README uses;
only the model and image sizes are shrunk by ``--config`` overrides so that
it runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import torch

from maskrcnn_jax import checkpoint, convert, evaluate, predict, train
from tests.cli_fixtures import ANNOTATIONS, FIXTURE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION_CLASSES = 6  # the "COCO" weights' classes; coco_tiny has 3 + background

# A small model and small images; everything else is the README's command.
TINY = {
    "model.depth": 18,
    "model.fpn_channels": 16,
    "model.representation_size": 32,
    "model.mask_head_dim": 16,
    "model.dtype": "float32",
    "model.roi_align_impl": "reference",
    "model.min_size": 64,
    "model.max_size": 96,
    "model.rpn_pre_nms_top_n_train": 200,
    "model.rpn_post_nms_top_n_train": 64,
    "model.rpn_pre_nms_top_n_test": 64,
    "model.rpn_post_nms_top_n_test": 32,
    "model.box_candidates": 64,
    "model.detections_per_img": 8,
    "model.box_score_thresh": 0.0,
    "model.rpn_batch_size_per_image": 64,
    "model.roi_batch_size_per_image": 32,
    "model.mask_rois_per_image": 8,
    "dataset.image_size": "(96, 96)",
    "dataset.aspect_canvases": "()",  # One canvas: one compile (test_train.py compiles two).
    "dataset.scales": "(64,)",
    "dataset.max_size": 96,
    "dataset.max_instances": 8,
    "dataset.num_workers": 0,
    "train.num_devices": 1,
    "train.batch_size": 2,
    "train.reference_batch_size": 2,
    "train.steps": 2,
    "train.warmup_steps": 1,
    "train.decay_steps": "(1000,)",
    "eval_at_end": False,
    "num_pictures": 0,
    "log_every": 1,
    "checkpoint_every": 2,
}


def _tiny_torchvision_maskrcnn(num_classes: int) -> torch.nn.Module:
    """A torchvision Mask R-CNN (ResNet-18-FPN, narrow heads) with random weights."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(0)
    body = resnet18(weights=None, norm_layer=misc.FrozenBatchNorm2d)
    layers = {f"layer{k}": str(k - 1) for k in range(1, 5)}
    backbone = BackboneWithFPN(body, layers, [64, 128, 256, 512], 16, LastLevelMaxPool())
    return MaskRCNN(
        backbone,
        box_head=TwoMLPHead(16 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        mask_head=MaskRCNNHeads(16, [16, 16, 16, 16], 1),
        mask_predictor=MaskRCNNPredictor(16, 16, num_classes),
    )


def test_finetune_converted_weights_on_a_coco_format_set(tmp_path, capsys, monkeypatch, caplog):
    # 1. Convert torchvision weights (a 5-class detector standing in for COCO's).
    pth, converted = tmp_path / "model.pth", str(tmp_path / "converted")
    torch.save(_tiny_torchvision_maskrcnn(TORCHVISION_CLASSES).state_dict(), pth)
    assert convert.main(["--from", "torchvision", "--input", str(pth), "--output", converted]) == 0
    start, start_config = checkpoint.load_model(converted)
    assert start_config.num_classes == TORCHVISION_CLASSES and start_config.norm == "frozen_bn"

    # 2. Fine-tune on the COCO-format set: 3 categories + background.
    run = str(tmp_path / "run")
    argv = [
        "train", "--config", os.path.join(ROOT, "experiments", "coco_r50_fpn_1x.py"),
        "--workdir", run,
        f"--config.dataset.train_annotations={ANNOTATIONS}", f"--config.dataset.train_images={FIXTURE}",
        f"--config.dataset.val_annotations={ANNOTATIONS}", f"--config.dataset.val_images={FIXTURE}",
        "--config.model.num_classes=4", f"--config.init.checkpoint={converted}",
        f"--config.dataset.data_dir={tmp_path / 'data'}",
        *(f"--config.{k}={v}" for k, v in TINY.items()),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    with caplog.at_level(logging.INFO):
        assert train.main(argv) == 0, capsys.readouterr().err
    assert "drop_empty_images: 1 of 4 train images" in caplog.text  # empty.png
    assert "schedule: 2 steps at batch 2" in caplog.text
    assert "epochs of 3)" in caplog.text
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))

    tuned, tuned_config = checkpoint.load_model(run)
    assert tuned_config.num_classes == 4 and list(tuned_config.category_ids) == [0, 1, 3, 7]
    # The frozen stem kept the converted weights (freeze_at=2); the class layers are new.
    stem = ("params", "backbone", "conv1", "kernel")
    np.testing.assert_array_equal(_get(tuned, stem), _get(start, stem))
    logits = ("params", "roi_box_head", "cls_score", "kernel")
    assert _get(start, logits).shape[-1] == TORCHVISION_CLASSES
    assert _get(tuned, logits).shape[-1] == 4

    # 3. Evaluate the fine-tuned work dir on the set, one image per call: predict's
    # default, so step 4 loads its compiled bucket from the session's cache.
    metrics_path = tmp_path / "metrics.json"
    code = evaluate.main(["--checkpoint", run, "--annotations", ANNOTATIONS, "--images", FIXTURE,
                          "--output", str(metrics_path), "--batch_size", "1"])  # fmt: skip
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["images"] == 4 and metrics["skipped"] == 0
    assert all(-1.0 <= v <= 1.0 for v in metrics["segm"].values())

    # 4. Predict: pictures and COCO results with the dataset's category ids.
    out = tmp_path / "out"
    image = os.path.join(FIXTURE, "shapes_1.png")
    assert predict.main(["--checkpoint", run, "--output_dir", str(out), image]) == 0
    assert sorted(os.listdir(out)) == ["predictions.json", "shapes_1.png"]
    results = json.loads((out / "predictions.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 7}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
