"""coco_eval: results encoding, label mapping, numbers equal to pycocotools', run_evaluation."""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from PIL import Image
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import coco_eval
from maskrcnn_jax.coco_names import (
    COCO_CATEGORY_NAMES,
    COCO_CLASS_NAMES,
    TORCHVISION_COCO_CLASS_NAMES,
)
from tests.cli_fixtures import FakePredictor

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "coco_tiny")
ANNOTATIONS = os.path.join(FIXTURE, "instances.json")
RESULTS = os.path.join(FIXTURE, "results.json")


@pytest.fixture(scope="module")
def coco_gt():
    return coco_eval.load_coco(ANNOTATIONS)


def gt_as_results(coco: COCO) -> list[dict]:
    """Every non-crowd ground-truth object as a score-1 detection with its mask as RLE."""
    results = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        mask = coco.annToMask(ann)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": coco_eval.encode_masks(mask[None])[0],
            }
        )
    return results


def pycocotools_stats(annotations: str, results: list[dict], iou_type: str) -> np.ndarray:
    """The official way: pycocotools only; segm results carry no boxes (as Detectron writes)."""
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotations)
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def test_ground_truth_as_predictions_scores_one(coco_gt):
    metrics = coco_eval.evaluate_predictions(coco_gt, gt_as_results(coco_gt))
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert list(m) == list(coco_eval.STAT_NAMES)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
            assert m[name] == pytest.approx(1.0), (iou_type, name, m)


def test_fixture_matches_pycocotools(coco_gt):
    with open(RESULTS) as f:
        results = json.load(f)
    ours = coco_eval.evaluate_predictions(ANNOTATIONS, results)
    for iou_type in ("bbox", "segm"):
        expected = pycocotools_stats(ANNOTATIONS, json.loads(Path(RESULTS).read_text()), iou_type)
        got = np.array([ours[iou_type][n] for n in coco_eval.STAT_NAMES])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        assert 0.3 < got[0] < 0.9  # Not a degenerate fixture.
    # The caller's results are left as they were (loadRes writes into its input).
    with open(RESULTS) as f:
        assert results == json.load(f)


def test_verbose_prints_the_tables(coco_gt):
    lines = []
    coco_eval.evaluate_predictions(
        coco_gt, gt_as_results(coco_gt), iou_types=("segm",), verbose=True, print_fn=lines.append
    )
    text = "\n".join(lines)
    assert text.startswith("IoU metric: segm")
    assert text.count("Average Precision") == 6 and text.count("Average Recall") == 6


def test_no_detections_scores_zero_not_crash(coco_gt):
    metrics = coco_eval.evaluate_predictions(coco_gt, [])
    for iou_type in ("bbox", "segm"):
        assert all(v == 0.0 for v in metrics[iou_type].values()), metrics
    # Only the object-less image: nothing to find, pycocotools says -1.
    empty = [i["id"] for i in coco_gt.dataset["images"] if i["file_name"] == "empty.png"]
    metrics = coco_eval.evaluate_predictions(coco_gt, [], image_ids=empty)
    assert all(v == -1.0 for v in metrics["bbox"].values())
    metrics = coco_eval.evaluate_predictions(coco_gt, [], image_ids=[])
    assert all(v == -1.0 for v in metrics["segm"].values())


def test_image_ids_restrict_evaluation(coco_gt):
    results = [r for r in gt_as_results(coco_gt) if r["image_id"] == 1]
    everywhere = coco_eval.evaluate_predictions(coco_gt, results, iou_types=("bbox",))
    image_1 = coco_eval.evaluate_predictions(coco_gt, results, iou_types=("bbox",), image_ids=[1])
    assert everywhere["bbox"]["AR100"] < 1.0
    assert image_1["bbox"]["AR100"] == pytest.approx(1.0)


def test_bad_results_raise_value_error(coco_gt):
    with pytest.raises(ValueError, match="not in the annotation file"):
        coco_eval.evaluate_predictions(
            coco_gt,
            [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}],
            iou_types=("bbox",),
        )
    with pytest.raises(ValueError, match="no 'segmentation'"):
        coco_eval.evaluate_predictions(
            coco_gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]
        )
    with pytest.raises(ValueError, match="unknown iou type"):
        coco_eval.evaluate_predictions(coco_gt, [], iou_types=("keypoints",))


def test_load_coco_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.json: no such annotation file"):
        coco_eval.load_coco(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a JSON file"):
        coco_eval.load_coco(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO-format"):
        coco_eval.load_coco(str(bad))


def test_encode_masks_round_trip_with_str_counts():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = coco_eval.encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    rles = json.loads(json.dumps(rles))  # JSON-ready
    np.testing.assert_array_equal(coco_eval.decode_masks(rles), masks)
    assert coco_eval.encode_masks(np.zeros((0, 5, 5), bool)) == []


def test_prediction_to_results():
    masks = np.zeros((3, 10, 12), np.float32)
    masks[0, 2:5, 3:7] = 0.9
    masks[0, 6, 6] = 0.5  # At the threshold: background, as in torchvision.
    masks[0, 8, 8] = 0.51
    masks[0, 7, 7] = 0.49
    prediction = {
        "boxes": np.array([[3, 2, 7, 5], [0, 0, 4, 4], [1, 1, 2, 2]], np.float32),
        "scores": np.array([0.9, 0.3, 0.8], np.float32),
        "labels": np.array([1, 2, 3]),
        "masks": masks,
    }
    table = np.array([-1, 11, 12, -1])  # Label 3 has no category: dropped.
    results = coco_eval.prediction_to_results(
        prediction, 5, category_ids=table, score_threshold=0.5
    )
    assert len(results) == 1
    (r,) = results
    assert (r["image_id"], r["category_id"], r["bbox"]) == (5, 11, [3.0, 2.0, 4.0, 3.0])
    assert r["score"] == pytest.approx(0.9)
    decoded = mask_util.decode(r["segmentation"])
    np.testing.assert_array_equal(decoded, masks[0] > 0.5)
    assert decoded[8, 8] == 1 and decoded[6, 6] == 0 and decoded[7, 7] == 0
    named = coco_eval.prediction_to_results(prediction, "a.jpg", image_key="image")
    assert [x["category_id"] for x in named] == [1, 2, 3] and named[0]["image"] == "a.jpg"
    no_masks = {k: v for k, v in prediction.items() if k != "masks"}
    assert "segmentation" not in coco_eval.prediction_to_results(no_masks, 1)[0]


def test_label_to_category_id(coco_gt):
    cfg = ml_collections.ConfigDict({"num_classes": 4})
    np.testing.assert_array_equal(coco_eval.label_to_category_id(cfg, coco_gt), [-1, 1, 3, 7])
    with pytest.raises(ValueError, match="no 'category_ids'"):
        coco_eval.label_to_category_id(cfg)
    with pytest.raises(ValueError, match="3 categories"):
        coco_eval.label_to_category_id(ml_collections.ConfigDict({"num_classes": 3}), coco_gt)
    # The config's own map wins, given for labels 1..K or for 0..K.
    for ids in ([5, 6, 9], [0, 5, 6, 9]):
        cfg = ml_collections.ConfigDict({"num_classes": 4, "category_ids": ids})
        np.testing.assert_array_equal(coco_eval.label_to_category_id(cfg, coco_gt), [-1, 5, 6, 9])
    # torchvision COCO: labels are COCO ids.
    table = coco_eval.label_to_category_id({"num_classes": 91})
    assert table[0] == -1 and table[1] == 1 and table[90] == 90


def test_coco_names():
    assert len(TORCHVISION_COCO_CLASS_NAMES) == 91 and len(COCO_CLASS_NAMES) == 80
    assert TORCHVISION_COCO_CLASS_NAMES[0] == "__background__"
    assert COCO_CATEGORY_NAMES[1] == "person" and COCO_CATEGORY_NAMES[90] == "toothbrush"
    assert TORCHVISION_COCO_CLASS_NAMES[12] == "N/A" and 12 not in COCO_CATEGORY_NAMES


# ---------------------------------------------------------------------------
# run_evaluation: a fake predictor that returns the fixture's ground truth.
# ---------------------------------------------------------------------------


def test_run_evaluation_ground_truth_scores_one():
    lines = []
    metrics = coco_eval.run_evaluation(
        FakePredictor(), ANNOTATIONS, FIXTURE, batch_size=3, verbose=True, log=lines.append
    )
    assert metrics["images"] == 4 and metrics["skipped"] == 0 and not lines
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["APl"] == pytest.approx(1.0)


def test_run_evaluation_max_images_and_no_detections():
    metrics = coco_eval.run_evaluation(FakePredictor(score=0.01), ANNOTATIONS, FIXTURE,
                                       max_images=2, score_threshold=0.5)  # fmt: skip
    assert metrics["images"] == 2
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AR100"] == 0.0


def test_evaluate_skips_image_of_the_wrong_size(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(FIXTURE, images)
    Image.new("RGB", (10, 10)).save(images / "shapes_1.png")
    lines = []
    metrics = coco_eval.run_evaluation(FakePredictor(), ANNOTATIONS, str(images), log=lines.append)
    assert metrics["skipped"] == 1 and "size 10x10 differs" in lines[0]


def test_mask_rles_of_results_file_decode(tmp_path):
    """--predictions writes the COCO results evaluated, with str RLE counts."""
    path = tmp_path / "results.json"
    coco_eval.run_evaluation(FakePredictor(), ANNOTATIONS, FIXTURE, results_file=str(path))
    results = json.loads(Path(path).read_text())
    assert {r["category_id"] for r in results} == {1, 3, 7}
    assert mask_util.decode(results[0]["segmentation"]).any()


def test_per_class_ap_hand_built(coco_gt):
    """Ground truth fed back: every class 1.0; drop 'square' detections: it alone scores 0.0."""
    metrics = coco_eval.evaluate_predictions(coco_gt, gt_as_results(coco_gt), per_class=True)
    assert set(metrics["per_class"]) == {"circle", "square", "triangle"}
    for name, aps in metrics["per_class"].items():
        assert aps == {"bbox_AP": pytest.approx(1.0), "segm_AP": pytest.approx(1.0)}, name
    no_square = [r for r in gt_as_results(coco_gt) if r["category_id"] != 3]
    lines = []
    metrics = coco_eval.evaluate_predictions(
        coco_gt, no_square, per_class=True, verbose=True, print_fn=lines.append
    )
    assert metrics["per_class"]["square"] == {"bbox_AP": 0.0, "segm_AP": 0.0}
    assert metrics["per_class"]["circle"]["segm_AP"] == pytest.approx(1.0)
    # The all-class AP is the mean of the per-class APs (pycocotools' own definition).
    for t in ("bbox", "segm"):
        mean = np.mean([aps[f"{t}_AP"] for aps in metrics["per_class"].values()])
        assert metrics[t]["AP"] == pytest.approx(mean, abs=1e-12)
    table = lines[-1].splitlines()
    assert table[0].split() == ["category", "bbox_AP", "segm_AP"]
    assert table[3].split() == ["square", "0.000", "0.000"]


def test_per_class_ap_without_ground_truth_is_minus_one(coco_gt):
    """A category with no ground truth on the evaluated images: -1, as pycocotools' ranges."""
    only_3 = [r for r in gt_as_results(coco_gt) if r["image_id"] == 3]
    cats_on_3 = {a["category_id"] for a in coco_gt.imgToAnns[3]}
    assert len(cats_on_3) < len(coco_gt.getCatIds())  # the fixture leaves a class out
    metrics = coco_eval.evaluate_predictions(
        coco_gt, only_3, iou_types=("bbox",), image_ids=[3], per_class=True
    )
    names = coco_eval.category_names(coco_gt)
    for cid, name in names.items():
        expected = pytest.approx(1.0) if cid in cats_on_3 else -1.0
        assert metrics["per_class"][name]["bbox_AP"] == expected, (name, metrics)
