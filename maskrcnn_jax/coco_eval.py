"""pycocotools glue: predictions -> COCO results -> the 12 standard numbers.

COCO results format (one dict per detection)::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float,
     "segmentation": {"size": [H, W], "counts": str}}   # compressed RLE

Boxes are in original-image pixels; ``w = x2 - x1`` (no +1), as torchvision and
detectron2 write them. Masks are binarised as ``probability > 0.5`` (torchvision's
reference evaluation) before encoding.

Evaluation follows the official protocol: for ``bbox`` the results are loaded
without their masks, for ``segm`` without their boxes, so that pycocotools
computes each detection's area (used for the small / medium / large ranges)
from the geometry being evaluated. Metric values are exactly what
``COCOeval.summarize`` gives: fractions in [0, 1], ``-1`` where a range has no
ground truth.

:func:`run_evaluation` is the whole loop over a COCO-format file: read each
image, run a predictor, convert, evaluate. ``python -m maskrcnn_jax.evaluate``
and the evaluation during training both call it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax import image_io
from maskrcnn_jax.coco_names import NUM_TORCHVISION_COCO_CLASSES

IOU_TYPES = ("bbox", "segm")

# Names of ``COCOeval.stats``, in order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


# ---------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------


def load_coco(annotations: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A ``COCO`` object from a file path, a parsed dict or an existing ``COCO`` (returned as is).

    Raises:
      ValueError: naming the file when it is missing or not COCO-format JSON.
    """
    if isinstance(annotations, COCO):
        return annotations
    if isinstance(annotations, Mapping):
        dataset = copy.deepcopy(dict(annotations))
        name = "annotations"
    else:
        name = os.fspath(annotations)
        try:
            with open(name) as f:
                dataset = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{name}: no such annotation file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{name}: not a JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{name}: not a COCO-format annotation file (no 'images' list)")  # noqa: TRY004
    dataset.setdefault("annotations", [])
    dataset.setdefault("categories", [])
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------
# Labels -> category ids
# ---------------------------------------------------------------------------


def by_label(values: Sequence[Any], num_classes: int, what: str) -> list[Any]:
    """``values`` (from a model config) indexed by label: a list of ``num_classes`` (index 0 = background) as
    is, or one of ``num_classes - 1`` (label k at index k - 1) with a ``None`` prepended."""
    values = list(values)
    if len(values) == num_classes:
        return values
    if len(values) == num_classes - 1:
        return [None] + values
    raise ValueError(
        f"model config has {len(values)} {what} for num_classes={num_classes} "
        f"(expected {num_classes} or {num_classes - 1})"
    )


def label_to_category_id(model_config: Any, coco_gt: COCO | None = None) -> np.ndarray:
    """The dataset category id of each model label.

    In this order:

    1. the model config's ``category_ids`` (written by training on a dataset);
       a list of ``num_classes`` entries is indexed by label, one of
       ``num_classes - 1`` entries gives label ``k`` at index ``k - 1``;
    2. ``num_classes == 91`` (torchvision's COCO checkpoints): the label *is*
       the COCO category id;
    3. otherwise contiguous label ``k`` (1-based) is the ``k``-th category of
       ``coco_gt`` sorted by id (how training numbers a COCO file's categories).

    Args:
      model_config: ``ConfigDict`` or dict with ``num_classes`` and optionally
        ``category_ids``.
      coco_gt: the annotation file, needed for rule 3 only.

    Returns:
      ``[num_classes] int64``; ``-1`` for background and unmapped labels.

    Raises:
      ValueError: when rule 3 applies and the counts disagree, or no file is given.
    """
    num_classes = int(config_get(model_config, "num_classes"))
    table = np.full((num_classes,), -1, np.int64)
    category_ids = config_get(model_config, "category_ids")
    if category_ids is not None:
        for label, cid in enumerate(by_label(category_ids, num_classes, "category_ids")):
            if label > 0 and cid is not None:
                table[label] = int(cid)
        return table
    if num_classes == NUM_TORCHVISION_COCO_CLASSES:
        table[1:] = np.arange(1, num_classes)
        return table
    if coco_gt is None:
        raise ValueError(
            f"cannot map labels of a {num_classes}-class model to category ids: "
            "the model config has no 'category_ids' and no annotation file was given"
        )
    cat_ids = sorted(coco_gt.getCatIds())
    if len(cat_ids) != num_classes - 1:
        raise ValueError(
            f"model has {num_classes - 1} classes (+ background) but the annotation file has "
            f"{len(cat_ids)} categories, and the model config has no 'category_ids' to map them"
        )
    table[1:] = cat_ids
    return table


def model_config_of(predictor: Any) -> Any:
    """A predictor's model config: its ``model_config``, else its ``config``."""
    config = getattr(predictor, "model_config", None)
    if config is None:
        config = getattr(predictor, "config", None)
    if config is None:
        raise ValueError(f"{type(predictor).__name__} has no model_config")
    return config


def config_get(config: Any, key: str) -> Any:
    """``config[key]`` of a ``ConfigDict``, dict or plain object; ``None`` when absent."""
    if isinstance(config, Mapping):
        return config.get(key)
    try:
        return config.get(key)  # ConfigDict
    except AttributeError:
        return getattr(config, key, None)


# ---------------------------------------------------------------------------
# Predictions -> results
# ---------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs of binary masks.

    Args:
      masks: ``[N, H, W]`` bool or {0, 1}.

    Returns:
      N dicts ``{"size": [H, W], "counts": str}`` (JSON-ready).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_masks(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``[N, H, W] uint8`` masks of COCO RLEs (``counts`` str or bytes)."""
    if not rles:
        raise ValueError("no RLEs to decode")
    return np.asarray(mask_util.decode(list(rles))).transpose(2, 0, 1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xyxy -> ``[N, 4]`` xywh."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def prediction_to_results(
    prediction: Mapping[str, Any],
    image_id: Any,
    category_ids: np.ndarray | None = None,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    image_key: str = "image_id",
) -> list[dict[str, Any]]:
    """COCO results of one image's prediction.

    Args:
      prediction: ``boxes [N, 4]`` xyxy original pixels, ``scores [N]``,
        ``labels [N]`` int, optionally ``masks [N, H, W]`` (or ``[N, 1, H, W]``)
        probabilities.
      image_id: value stored under ``image_key``.
      category_ids: ``[num_classes]`` label -> category id (``-1`` = drop the
        detection), from ``label_to_category_id``; ``None`` writes labels as ids.
      score_threshold: detections scoring below it are dropped.
      mask_threshold: mask probability above which a pixel is foreground
        (strictly, as torchvision's COCO evaluation); bool masks are taken as they are.
      image_key: ``"image_id"`` for evaluation, ``"image"`` for file names.

    Returns:
      One dict per kept detection, in the prediction's order.
    """
    boxes = np.asarray(prediction["boxes"], np.float64).reshape(-1, 4)
    scores = np.asarray(prediction["scores"], np.float64).reshape(-1)
    labels = np.asarray(prediction["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"boxes {boxes.shape}, scores {scores.shape}, labels {labels.shape} disagree in N"
        )
    cats = labels
    keep = scores >= score_threshold
    if category_ids is not None:
        category_ids = np.asarray(category_ids)
        in_range = (labels >= 0) & (labels < len(category_ids))
        cats = np.where(in_range, category_ids[np.clip(labels, 0, len(category_ids) - 1)], -1)
        keep &= cats >= 0
    idx = np.flatnonzero(keep)
    rles = None
    if prediction.get("masks") is not None:
        masks = np.asarray(prediction["masks"])
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.ndim != 3 or masks.shape[0] != len(boxes):
            raise ValueError(f"masks must be [N, H, W] with N={len(boxes)}, got {masks.shape}")
        rles = encode_masks(masks[idx] > mask_threshold)
    xywh = xyxy_to_xywh(boxes[idx])
    results = []
    for j, i in enumerate(idx):
        result = {
            image_key: image_id,
            "category_id": int(cats[i]),
            "bbox": [round(float(v), 3) for v in xywh[j]],
            "score": round(float(scores[i]), 5),
        }
        if rles is not None:
            result["segmentation"] = rles[j]
        results.append(result)
    return results


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _results_for(results: Iterable[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Shallow copies (loadRes writes into them) holding only ``iou_type``'s geometry."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    need = "bbox" if iou_type == "bbox" else "segmentation"
    out = []
    for r in results:
        if need not in r:
            raise ValueError(f"a result has no '{need}', cannot evaluate {iou_type}: {dict(r)}")
        out.append({k: v for k, v in r.items() if k != drop})
    return out


def _load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    if results:
        gt_ids = set(coco_gt.getImgIds())
        unknown = {r["image_id"] for r in results} - gt_ids
        if unknown:
            raise ValueError(
                f"results name image ids not in the annotation file: {sorted(unknown)[:10]}"
            )
        return coco_gt.loadRes(results)
    # loadRes cannot take an empty list; an empty result set scores as pycocotools
    # would score "no detections": 0 where there is ground truth, -1 elsewhere.
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def evaluate_predictions(
    coco_gt: str | os.PathLike | Mapping[str, Any] | COCO,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
    print_fn: Callable[[str], None] = print,
    per_class: bool = False,
) -> dict[str, Any]:
    """Runs ``COCOeval`` for each IoU type.

    Args:
      coco_gt: ground truth (``COCO``, path or dict).
      results: COCO results (see module doc); may be empty.
      iou_types: some of ``"bbox"``, ``"segm"``.
      image_ids: evaluate on these images only (e.g. those actually run);
        ``None`` = every image of ``coco_gt``.
      verbose: print each type's 12-line table (``print_fn``), headed
        ``IoU metric: <type>``; pycocotools' progress chatter is never printed.
      print_fn: where tables go.
      per_class: also compute each category's AP (:func:`per_class_ap`),
        returned under ``"per_class"`` and, with ``verbose``, printed as a table.

    Returns:
      ``{iou_type: {"AP": ..., ..., "ARl": ...}}`` with ``STAT_NAMES`` keys;
      with ``per_class`` also ``"per_class": {name: {"bbox_AP": .., "segm_AP": ..}}``.

    Raises:
      ValueError: unknown IoU type, results for images not in ``coco_gt``, or
        results lacking the geometry of a requested type.
    """
    coco_gt = load_coco(coco_gt)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type {iou_type!r}; expected one of {IOU_TYPES}")
    img_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(set(image_ids))
    metrics: dict[str, Any] = {}
    classes: dict[str, dict[str, float]] = {}
    names = category_names(coco_gt)
    for iou_type in iou_types:
        if not img_ids:
            metrics[iou_type] = {name: -1.0 for name in STAT_NAMES}
            for name in names.values():
                classes.setdefault(name, {})[f"{iou_type}_AP"] = -1.0
            continue
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            coco_dt = _load_results(coco_gt, _results_for(results, iou_type))
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = img_ids
            evaluator.evaluate()
            evaluator.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            evaluator.summarize()
        if verbose:
            print_fn(f"IoU metric: {iou_type}\n{table.getvalue().rstrip()}")
        metrics[iou_type] = {
            name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
        }
        for cat_id, ap in per_class_ap(evaluator).items():
            classes.setdefault(names[cat_id], {})[f"{iou_type}_AP"] = ap
    if per_class:
        metrics["per_class"] = classes
        if verbose:
            print_fn(format_per_class(classes, iou_types))
    return metrics


def category_names(coco_gt: COCO) -> dict[int, str]:
    """Category id -> name (``"<name> (<id>)"`` where names repeat; the id where none)."""
    cats = sorted(coco_gt.dataset.get("categories", []), key=lambda c: c["id"])
    raw = {c["id"]: str(c.get("name", c["id"])) for c in cats}
    counts: dict[str, int] = {}
    for name in raw.values():
        counts[name] = counts.get(name, 0) + 1
    return {i: (n if counts[n] == 1 else f"{n} ({i})") for i, n in raw.items()}


def per_class_ap(evaluator: COCOeval, max_dets: int = 100) -> dict[int, float]:
    """AP of each category from an accumulated ``COCOeval``'s precision array.

    ``eval["precision"]`` is ``[T, R, K, A, M]`` (IoU thresholds, recall
    points, categories, area ranges, max detections); a category's AP is the
    mean over T and R at area ``all`` and ``maxDets = max_dets``, leaving out
    the ``-1`` entries (what ``COCOeval.summarize`` does for all categories at
    once). ``-1`` for a category without ground truth on the evaluated images.

    Returns:
      ``{category_id: AP}`` for ``evaluator.params.catIds``.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    area = params.areaRngLbl.index("all")
    dets = list(params.maxDets).index(max_dets)
    out = {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area, dets]
        p = p[p > -1]
        out[int(cat_id)] = float(np.mean(p)) if p.size else -1.0
    return out


def format_per_class(
    per_class: Mapping[str, Mapping[str, float]], iou_types: Sequence[str] = IOU_TYPES
) -> str:
    """A text table, one row per category: name, then AP per IoU type (``-`` for -1)."""
    width = max([len("category"), *(len(n) for n in per_class)])
    head = f"{'category':<{width}}" + "".join(f"  {t + '_AP':>8}" for t in iou_types)
    rows = [head, "-" * len(head)]
    for name, aps in per_class.items():
        cells = []
        for t in iou_types:
            v = aps.get(f"{t}_AP", -1.0)
            cells.append(f"  {'-' if v < 0 else f'{v:.3f}':>8}")
        rows.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(rows)


def run_evaluation(
    predictor: Callable[[list[np.ndarray]], list[dict[str, Any]]],
    annotations: str | os.PathLike | Mapping[str, Any] | COCO,
    images_dir: str | os.PathLike,
    max_images: int | None = None,
    batch_size: int = 8,
    score_threshold: float = 0.0,
    category_ids: np.ndarray | None = None,
    iou_types: Sequence[str] | None = None,
    verbose: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    results_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs ``predictor`` over a COCO-format file's images and evaluates with pycocotools.

    Images are taken by id (the first ``max_images`` with a limit) and read
    in their stored pixel frame (no EXIF rotation), as COCO's annotations
    are. Only the images actually run are evaluated: an unreadable image, or
    one whose size differs from the annotation's ``height``/``width``, is
    reported to ``log`` (``"skipped: <reason>"``), counted and left out
    instead of counting as a miss.

    Args:
      predictor: maps a list of ``[H, W, 3] uint8`` images to per-image dicts
        (``boxes [N, 4]`` xyxy original pixels, ``scores``, ``labels``,
        ``masks [N, H, W]`` probabilities); an ``inference.Predictor``.
      annotations: COCO ground truth (path, dict or ``COCO``).
      images_dir: directory the ``file_name`` of each image is relative to.
      max_images: evaluate the first N images by id only.
      batch_size: images per predictor call.
      score_threshold: drop detections below it (the predictor's own threshold
        applies first).
      category_ids: ``[num_classes]`` label -> category id; default from
        the predictor's ``model_config`` (:func:`label_to_category_id`).
      iou_types: default ``("bbox", "segm")``, ``("bbox",)`` if any prediction
        has no masks.
      verbose: print the 12-line table of each IoU type.
      progress: show a tqdm bar (on a terminal).
      log: receives one line per skipped image (default: stderr).
      results_file: also write the COCO results JSON there.

    Returns:
      ``{"bbox": {STAT_NAME: value}, "segm": {...}, "per_class": {name: {"bbox_AP": ..,
      "segm_AP": ..}}, "images": int, "skipped": int}``.

    Raises:
      ValueError: bad annotation file, label mapping or ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    coco_gt = load_coco(annotations)
    if category_ids is None:
        category_ids = label_to_category_id(model_config_of(predictor), coco_gt)
    images = sorted(coco_gt.dataset["images"], key=lambda img: img["id"])
    if max_images is not None:
        images = images[: max(0, max_images)]

    def load(info: Mapping[str, Any]) -> np.ndarray:
        path = os.path.join(os.fspath(images_dir), info["file_name"])
        image = image_io.load_image(path, exif_transpose=False)
        expected = (info.get("height"), info.get("width"))
        if None not in expected and image.shape[:2] != tuple(expected):
            raise image_io.ImageError(
                f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the "
                f"annotation's {expected[1]}x{expected[0]}"
            )
        return image

    results: list[dict[str, Any]] = []
    done: list[int] = []
    skipped = 0
    all_masks = True
    for batch in image_io.load_batches(
        images, load, batch_size, log=log, log_prefix="skipped", progress=progress,
        desc="evaluate",
    ):  # fmt: skip
        skipped += len(batch.skipped)
        predictions = predictor(batch.images) if batch.images else []
        for info, prediction in zip(batch.items, predictions, strict=True):
            prediction = {k: np.asarray(v) for k, v in prediction.items()}
            all_masks &= prediction.get("masks") is not None
            results.extend(
                prediction_to_results(
                    prediction, info["id"], category_ids=category_ids,
                    score_threshold=score_threshold,
                )  # fmt: skip
            )
            done.append(info["id"])

    if results_file is not None:
        with open(results_file, "w") as f:
            json.dump(results, f)
    if iou_types is None:
        iou_types = IOU_TYPES if all_masks else ("bbox",)
    metrics: dict[str, Any] = evaluate_predictions(
        coco_gt, results, iou_types=iou_types, image_ids=done, verbose=verbose, per_class=True
    )
    metrics["images"] = len(done)
    metrics["skipped"] = skipped
    return metrics
