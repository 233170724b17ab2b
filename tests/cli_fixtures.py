"""Helpers shared by the tests of image_io, visualize, coco_eval, predict and evaluate.

The model is a fake with the ``inference.Predictor`` call signature that returns
the fixture's ground truth, so most of these tests run in about a second; the
end-to-end tests use a real random-weight checkpoint (``tiny_checkpoint``).

Test modules import the fixtures they use by name (pytest finds fixtures in a
test module's namespace). ``tiny_checkpoint`` builds its checkpoint and
compiled Predictor once per session, whichever module asks first.
"""

from __future__ import annotations

import os
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from maskrcnn_jax import coco_eval

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


_TINY_CHECKPOINT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint dir, Predictor loaded from it) of a tiny random 4-class model."""
    if "value" not in _TINY_CHECKPOINT:  # One build per session across modules.
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
        _TINY_CHECKPOINT["value"] = (path, inference.Predictor.from_checkpoint(path))
    return _TINY_CHECKPOINT["value"]


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
