"""export: jax.export artifacts give Predictor's detections; CLI flags and errors.

Models: a torchvision ResNet-18-FPN Mask R-CNN (random weights, small
min/max size) converted to ours, and the tiny experiment's model after two
training steps. Tolerances: both paths run the same StableHLO on the same CPU
(the exported one deserialised), so detections agree to float32 rounding of
reordered sums at most: boxes within 1e-4 pixels, thresholded masks equal.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import export, serving, sharding, train
from maskrcnn_jax.inference import Predictor
from maskrcnn_jax.modeling import MaskRCNN
from maskrcnn_jax.torchvision_weights import config_from_state_dict, convert_torchvision_state_dict
from tests.test_convert import _tiny_torchvision_maskrcnn


def _images() -> list[np.ndarray]:
    """Three sizes (landscape, portrait, square), so several buckets are used."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((48, 80), (90, 50), (64, 64)):
        yy, xx = np.mgrid[:h, :w]
        image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        image[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (min(h, w) // 4) ** 2] = (220, 40, 40)
        image[h // 4 : h // 2, w // 2 : w - 4] = (30, 200, 90)
        images.append(image)
    return images


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    total = 0
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g["labels"], e["labels"])
        np.testing.assert_allclose(g["boxes"], e["boxes"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(g["scores"], e["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g["masks"] > 0.5, e["masks"] > 0.5)
        assert g["masks"].shape == e["masks"].shape
        total += len(e["labels"])
    assert total > 0  # something was compared


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, tiny_train_batch, tiny_train_state):
    """The tiny experiment's model after two train steps, saved as a checkpoint."""
    config, batch = tiny_train_batch
    state, optimizer = tiny_train_state
    # Jitted as test_train.py's one-device step (the session's compilation cache has one).
    mesh = sharding.make_mesh(1)
    step, state_sharding = train.jit_train_step(
        MaskRCNN(config.model), config, optimizer, mesh, state
    )
    state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)  # it is donated
    for _ in range(2):
        state, _ = step(state, sharding.global_batch(batch, mesh))
    variables = jax.device_get(state.variables())
    model_config = config.model.copy_and_resolve_references()
    model_config.box_score_thresh = 0.0  # random-ish scores must still give detections
    directory = tmp_path_factory.mktemp("trained") / "ckpt"
    ckpt.save_model(str(directory), variables, model_config, step=2)
    return str(directory), variables, model_config


@pytest.fixture(scope="module")
def trained_export(trained_tiny, tmp_path_factory):
    """The CLI's default artifact (all three platforms) of the trained tiny checkpoint."""
    out = str(tmp_path_factory.mktemp("exported"))
    assert export.main(["--checkpoint", trained_tiny[0], "--output", out]) == 0
    return out


def test_cli_artifact_contents(trained_tiny, trained_export, capsys):
    directory, variables, model_config = trained_tiny
    with open(os.path.join(trained_export, serving.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["checkpoint"] == {"path": os.path.join(directory, "2"), "step": 2}
    assert manifest["buckets"] == [list(b) for b in Predictor(variables, model_config).buckets]
    assert (manifest["min_size"], manifest["max_size"]) == (model_config.min_size,
                                                             model_config.max_size)  # fmt: skip
    assert manifest["size_divisible"] == model_config.size_divisible
    category_ids = model_config.get("category_ids")
    assert manifest["category_ids"] == (None if category_ids is None else list(category_ids))
    assert manifest["versions"]["jax"] == jax.__version__
    assert manifest["roi_align_impl"] in export.PORTABLE_ROI_ALIGN
    predictor = serving.ExportedPredictor(trained_export)
    exported = predictor.exported(manifest["buckets"][0])
    assert exported.platforms == ("cpu", "cuda", "tpu")
    # The variables are arguments (stored once in params.npz), not constants.
    leaves = jax.tree.leaves(variables)
    assert len(exported.in_avals) == len(leaves) + 2
    jax.tree.map(np.testing.assert_array_equal, predictor.variables, variables)


def test_trained_tiny_exported_matches_predictor(trained_tiny, trained_export):
    _, variables, model_config = trained_tiny
    images = _images()
    expected = Predictor(variables, model_config)(images)
    got = serving.ExportedPredictor(trained_export)(images)
    assert_same_detections(got, expected)


def test_torchvision_converted_exported_matches_predictor(tmp_path):
    tv = _tiny_torchvision_maskrcnn()
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    # Fewer proposals and detections than torchvision's defaults (1000 / 1000 / 100), set
    # alike on both sides: with them, each inference call below took 8 s for the three
    # images on a 2-core CPU; with these, 2 s.
    counts = {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100,
              "detections_per_img": 20}
    config = config_from_state_dict(state, min_size=64, max_size=96, box_score_thresh=0.0,
                                    **counts)
    variables = convert_torchvision_state_dict(state, config)
    out = str(tmp_path / "tv")
    buckets = [(64, 96), (96, 96)]  # two buckets (not all seven): compiles are slow on CPU
    manifest = export.export_model(
        variables, config, out, platforms=("cpu",), batch_size=2, buckets=buckets
    )
    assert manifest["batch_size"] == 2 and manifest["buckets"] == [list(b) for b in buckets]
    images = _images()
    expected = Predictor(variables, config, buckets=buckets, batch_size=2)(images)
    got = serving.ExportedPredictor(out)(images)
    assert_same_detections(got, expected)
    with torch.no_grad():  # and torchvision agrees on what was detected (sanity, loose)
        tv.eval()
        tv.roi_heads.score_thresh = 0.0
        tv.rpn._pre_nms_top_n["testing"] = counts["rpn_pre_nms_top_n_test"]
        tv.rpn._post_nms_top_n["testing"] = counts["rpn_post_nms_top_n_test"]
        tv.roi_heads.detections_per_img = counts["detections_per_img"]
        ref = tv([torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255])[0]
    assert len(ref["labels"]) == len(got[0]["labels"])


def test_parse_platforms():
    assert export.parse_platforms("cpu, TPU") == ("cpu", "tpu")
    with pytest.raises(ValueError, match="valid: cpu, cuda, tpu"):
        export.parse_platforms("cpu,metal")


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--platforms", "cpu,gpu"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'gpu'" in err and "cpu, cuda, tpu" in err
    assert export.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]
    assert "not a checkpoint" in err[0]
