"""One command that measures every accelerator path (issue 9, item 3).

Run on a GPU machine (no package index there: fetch the wheels here first with
``make device-wheels``, then on that machine, from the repository root)::

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  python3 experiments/device_check.py --output $OUT/device_check.json

``--smoke`` runs the same code at tiny shapes on the CPU (Pallas in interpret
mode) in about a minute; ``--sections bfc`` picks sections. The JSON report
is rewritten after each section, so a run cut short still reports what it
measured, and markdown rows for the README are printed as sections finish.

Sections, most valuable first (a always runs):

- a: versions (jax, jaxlib, flax, optax, torch) and the devices.
- b: the compiled Pallas RoIAlign and the einsum one against the reference:
  forward and feature-gradient max error, float32 and bfloat16, COCO shapes
  (2 images x 512 RoIs, 256 channels, P2-P5 of an 800x1344 canvas, 7x7 and
  14x14, sampling 2). float32 tolerances are the parity tests' (1e-4 forward,
  1e-3 gradient, features N(0, 1)). bfloat16 inputs are compared with the
  float32 reference on the same (rounded) inputs; the bound is
  ``4 * 2**-8 * (A |x|)``, A the linear map of RoIAlign (forward: pooling of
  ``|x|``; gradient: its transpose applied to ``|cotangent|``): each output is
  a convex-weighted sum, and at most three bf16 roundings (weights,
  intermediate, output; 2**-8 relative each) plus float32 accumulation enter.
- f: whole-model detections with pallas and einsum equal to reference (a
  reduced random-weight ResNet-18 FPN model, synthetic images, float32 at
  ``Precision.HIGHEST``): same valid slots and labels, boxes within 1e-3 px.
- c: forward and forward+backward times (and XLA's memory of one call) of
  reference, pallas, einsum at b's shapes, float32 and bfloat16; torchvision's
  CUDA ``roi_align`` beside them when torch with CUDA is importable (in
  float32 for both rows: under AMP its autocast runs roi_align in float32).
- d: the R50-FPN train step in bfloat16 on synthetic COCO-like batches
  (``experiments/coco_r50_fpn_1x.py``'s landscape canvas and instance slots, 12
  instances with masks per image), batch 8 or the largest whose compiled
  memory fits: compile time, steady img/s, per-step device memory
  (``compiled.memory_analysis()``) for reference and pallas; torchvision's
  ``maskrcnn_resnet50_fpn`` AMP train step at the same batch in a subprocess.
- e: inference img/s at batch 1 and 8 (800x1066 images, 800x1088 canvas),
  ours (bfloat16) against torchvision (AMP, subprocess).
- g: NMS at 1000/2000/4000 boxes, the loop against the tiled one
  (``experiments/bench_nms.run``).

JAX runs with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that torch (in
process for c, in subprocesses for d and e) gets memory too. Nothing here
imports the data stack (tensorflow-datasets, grain, array-record,
pycocotools): the experiment configs are read with ``maskrcnn_jax.data``
narrowed to its config module (:func:`load_experiment_config`), and the
train step is built from ``MaskRCNN.losses`` and ``optim.make_optimizer``
(:func:`make_train_step`), since ``maskrcnn_jax.train`` imports the data
stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
import types
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: experiments/ is sys.path[0]
    sys.path.insert(0, REPO)

# import name -> pip name of what the check itself needs.
REQUIRED = {
    "numpy": "numpy",
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "ml_collections": "ml-collections",
}
DATA_STACK = ("tensorflow_datasets", "tensorflow", "grain", "array_record", "pycocotools")
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD"
)
SECTIONS = "abfcdeg"
BF16_ROUNDING = 2.0**-8  # bf16 unit roundoff (8-bit significand)
BF16_ROUNDINGS = 4  # weights, intermediate, output, + float32 accumulation slack
TOL = {"fwd_f32": 1e-4, "grad_f32": 1e-3, "det_box_px": 1e-3}


def missing_packages() -> list[str]:
    """pip names of :data:`REQUIRED` packages that do not import."""
    missing = []
    for module, pip_name in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip_name)
    return missing


def missing_message(missing: list[str]) -> str:
    """One line naming the missing packages and how to get them."""
    names = ", ".join(missing)
    if os.path.isdir(os.path.join(REPO, ".whl")):
        return f"device_check: missing packages: {names}; install the wheels in .whl/: {INSTALL}"
    return (
        f"device_check: missing packages: {names}; run `make device-wheels` on a machine with a "
        f"package index, copy .whl/ here, then: {INSTALL}"
    )


# ---------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the check uses; FULL on a GPU, SMOKE on the CPU."""

    roi_batch: int
    roi_num: int
    roi_channels: int
    roi_canvas: tuple[int, int]
    roi_outs: tuple[int, ...]
    time_dtypes: tuple[str, ...]  # dtypes timed in c
    strides: tuple[int, ...]
    det_model: dict | None  # None: the model of train_experiment (box_score_thresh 0)
    det_canvas: tuple[int, int]
    train_experiment: str  # experiments.<name> whose model, canvas and slots d uses
    train_batch: int
    train_instances: int
    train_steps: int
    train_impls: tuple[str, ...]  # RoIAlign implementations whose train step d times
    infer_experiment: str
    infer_image: tuple[int, int]  # image inside the canvas
    infer_canvas: tuple[int, int]
    infer_batches: tuple[int, ...]
    infer_steps: int
    nms_sizes: tuple[int, ...]
    nms_batch: int
    nms_tile: int
    repeats: int


_DET_MODEL = dict(
    depth=18,
    backbone_width=32,
    fpn_channels=64,
    representation_size=128,
    mask_head_dim=32,
    num_classes=8,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=100,
    box_candidates=256,
    detections_per_img=32,
    box_score_thresh=0.0,
    dtype="float32",
)

FULL = Shapes(
    roi_batch=2,
    roi_num=512,
    roi_channels=256,
    roi_canvas=(800, 1344),
    roi_outs=(7, 14),
    time_dtypes=("float32", "bfloat16"),
    strides=(4, 8, 16, 32),
    det_model=_DET_MODEL,
    det_canvas=(384, 512),
    train_experiment="coco_r50_fpn_1x",
    train_batch=8,
    train_instances=12,
    train_steps=5,
    train_impls=("reference", "pallas"),
    infer_experiment="coco_r50_fpn_1x",
    infer_image=(800, 1066),
    infer_canvas=(800, 1088),
    infer_batches=(1, 8),
    infer_steps=5,
    nms_sizes=(1000, 2000, 4000),
    nms_batch=8,
    nms_tile=128,
    repeats=5,
)

SMOKE = Shapes(
    roi_batch=2,
    roi_num=8,
    roi_channels=8,
    roi_canvas=(64, 96),
    roi_outs=(7,),
    time_dtypes=("bfloat16",),
    strides=(4, 8, 16, 32),
    det_model=None,
    det_canvas=(64, 64),
    train_experiment="tiny",
    train_batch=2,
    train_instances=8,
    train_steps=1,
    # One: the loop over implementations is the same code, and each tiny step
    # compiles for most of a minute on a 2-core CPU.
    train_impls=("pallas",),
    infer_experiment="tiny",
    infer_image=(48, 64),
    infer_canvas=(64, 64),
    infer_batches=(1,),
    infer_steps=1,
    nms_sizes=(64, 128),
    nms_batch=2,
    nms_tile=32,
    repeats=1,
)


def load_experiment_config(name: str):
    """``experiments.<name>.get_config()`` without importing the data stack.

    Experiment configs take their dataset fields from
    ``maskrcnn_jax.data.get_dataset_config``, whose package ``__init__``
    imports tensorflow-datasets and grain. When ``maskrcnn_jax.data`` is not
    already imported, it is stood in for, during this call only, by a
    package holding just ``maskrcnn_jax/data/config.py`` (ml_collections
    only); the stand-in is removed afterwards.
    """
    stub = "maskrcnn_jax.data" not in sys.modules
    touched = ("maskrcnn_jax.data", "maskrcnn_jax.data.config", "experiments.base",
               f"experiments.{name}")
    if stub:
        import maskrcnn_jax

        pkg = types.ModuleType("maskrcnn_jax.data")
        pkg.__path__ = [os.path.join(os.path.dirname(maskrcnn_jax.__file__), "data")]
        sys.modules["maskrcnn_jax.data"] = pkg
        pkg.get_dataset_config = importlib.import_module(
            "maskrcnn_jax.data.config"
        ).get_dataset_config
    try:
        return importlib.import_module(f"experiments.{name}").get_config()
    finally:
        if stub:
            for mod in touched:
                sys.modules.pop(mod, None)


# Model fields that do not change the variables (so f, d and e share one init).
_NOT_IN_VARIABLES = ("dtype", "roi_align_impl", "box_score_thresh")
_VARIABLES: dict[str, Any] = {}


def init_variables(config) -> dict:
    """``init_model(config, key 0)``, cached across sections for configs with the same variables."""
    import jax

    from maskrcnn_jax.modeling import init_model

    key = json.dumps({k: v for k, v in config.to_dict().items() if k not in _NOT_IN_VARIABLES},
                     sort_keys=True, default=str)
    if key not in _VARIABLES:
        _VARIABLES[key] = init_model(config, jax.random.key(0), (64, 64))
    return _VARIABLES[key]


# ---------------------------------------------------------------- report


class Report:
    """The JSON report, rewritten whole (atomically) after each section."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}

    def add(self, section: str, result: dict) -> None:
        self.data["sections"][section] = result
        self.write()

    def write(self) -> None:
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=_json_default)
        os.replace(tmp, self.path)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list]) -> str:
    return "\n".join([_row(head), "|" + "---|" * len(head)] + [_row(r) for r in rows])


def _f(x, fmt="{:.3g}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


# ---------------------------------------------------------------- a: versions


def section_a() -> dict:
    """Versions and devices."""
    import platform
    from importlib import metadata

    import jax

    versions = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchvision"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }


# ---------------------------------------------------------------- b: RoIAlign parity


def _roi_fns(impl: str, out: int, strides, sampling: int = 2):
    """jitted (features, boxes, cotangent) -> (output, feature gradients) of ``impl``."""
    import jax

    from maskrcnn_jax import ops

    def fwd(fs, b):
        return ops.multilevel_roi_align(fs, b, out, strides, sampling, impl=impl)

    def fwd_bwd(fs, b, ct):
        y, vjp = jax.vjp(lambda f: fwd(f, b), fs)
        return y, vjp(ct)[0]

    return jax.jit(fwd_bwd)


def section_b(shapes: Shapes) -> dict:
    """Max forward / gradient error of pallas and einsum against the reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import bench_ops

    feats, boxes = bench_ops.make_inputs(
        shapes.roi_batch, shapes.roi_num, shapes.roi_canvas, shapes.strides, shapes.roi_channels
    )
    jboxes = jnp.asarray(boxes)
    rows = []
    for out in shapes.roi_outs:
        rng = np.random.default_rng(out)
        cot = rng.normal(size=(*boxes.shape[:2], out, out, shapes.roi_channels))
        ref_fn = _roi_fns("reference", out, shapes.strides)
        for dtype in ("float32", "bfloat16"):
            x = [jnp.asarray(f, dtype) for f in feats]  # the inputs, rounded for bf16
            ct = jnp.asarray(cot, dtype)
            x32 = [f.astype(jnp.float32) for f in x]
            ct32 = ct.astype(jnp.float32)
            y_ref, g_ref = ref_fn(x32, jboxes, ct32)
            if dtype == "bfloat16":
                # The linear map applied to |x| and |ct|: the scale of each output's terms.
                y_abs, g_abs = ref_fn([jnp.abs(f) for f in x32], jboxes, jnp.abs(ct32))
                k = BF16_ROUNDINGS * BF16_ROUNDING
                y_tol = k * np.asarray(y_abs) + 1e-6
                g_tol = [k * np.asarray(g) + 1e-6 for g in g_abs]
            for impl in ("pallas", "einsum"):
                y, g = _roi_fns(impl, out, shapes.strides)(x, jboxes, ct)
                y = np.asarray(jnp.asarray(y, jnp.float32))
                g = [np.asarray(jnp.asarray(gi, jnp.float32)) for gi in g]
                y_err = np.abs(y - np.asarray(y_ref))
                g_err = [np.abs(gi - np.asarray(gr)) for gi, gr in zip(g, g_ref)]
                if dtype == "float32":
                    fwd_ratio = float(y_err.max() / TOL["fwd_f32"])
                    grad_ratio = max(float(e.max()) for e in g_err) / TOL["grad_f32"]
                else:
                    fwd_ratio = float((y_err / y_tol).max())
                    grad_ratio = max(float((e / t).max()) for e, t in zip(g_err, g_tol))
                rows.append(
                    {
                        "impl": impl,
                        "dtype": dtype,
                        "out": out,
                        "fwd_max_err": float(y_err.max()),
                        "grad_max_err": max(float(e.max()) for e in g_err),
                        "fwd_err_over_tol": fwd_ratio,
                        "grad_err_over_tol": grad_ratio,
                        "ok": bool(fwd_ratio <= 1 and grad_ratio <= 1),
                    }
                )
    return {
        "shapes": {
            "batch": shapes.roi_batch,
            "rois": shapes.roi_num,
            "channels": shapes.roi_channels,
            "canvas": shapes.roi_canvas,
            "strides": shapes.strides,
            "sampling_ratio": 2,
        },
        "compiled_pallas": jax.default_backend() == "gpu",
        "rows": rows,
        "ok": all(r["ok"] for r in rows),
    }


def markdown_b(res: dict) -> str:
    head = ["impl", "dtype", "out", "fwd max err", "grad max err", "err/tol fwd", "err/tol grad"]
    rows = [
        [r["impl"], r["dtype"], f"{r['out']}x{r['out']}", _f(r["fwd_max_err"]),
         _f(r["grad_max_err"]), _f(r["fwd_err_over_tol"], "{:.2f}"),
         _f(r["grad_err_over_tol"], "{:.2f}")]
        for r in res["rows"]
    ]
    return _table(head, rows)


# ---------------------------------------------------------------- f: whole-model parity


def section_f(shapes: Shapes) -> dict:
    """Detections with pallas and einsum against those with the reference."""
    import jax
    import numpy as np

    from maskrcnn_jax.modeling import MaskRCNN, get_model_config

    if shapes.det_model is None:
        config = load_experiment_config(shapes.train_experiment).model
        config.box_score_thresh = 0.0
        config.dtype = "float32"
    else:
        config = get_model_config(**shapes.det_model)
    variables = init_variables(config)
    rng = np.random.default_rng(0)
    h, w = shapes.det_canvas
    images = rng.uniform(0, 255, (2, h, w, 3)).astype(np.float32)
    sizes = np.array([[h, w], [h - 14, w - 27]], np.int32)

    def detect(impl):
        c = config.copy_and_resolve_references()
        c.roi_align_impl = impl
        with jax.default_matmul_precision("highest"):
            fn = jax.jit(lambda v, x, s: MaskRCNN(c).apply(v, x, s))
            return jax.device_get(fn(variables, images, sizes))

    ref = detect("reference")
    rows = []
    for impl in ("pallas", "einsum"):
        out = detect(impl)
        both = out["valid"] & ref["valid"]
        box_err = float(np.abs(out["boxes"] - ref["boxes"])[both].max(initial=0.0))
        row = {
            "impl": impl,
            "detections": int(ref["valid"].sum()),
            "valid_equal": bool(np.array_equal(out["valid"], ref["valid"])),
            "labels_equal": bool(np.array_equal(out["labels"], ref["labels"])),
            "box_max_err_px": box_err,
            "score_max_err": float(np.abs(out["scores"] - ref["scores"])[both].max(initial=0.0)),
            "mask_max_err": float(np.abs(out["masks"] - ref["masks"])[both].max(initial=0.0)),
        }
        row["ok"] = bool(
            row["valid_equal"] and row["labels_equal"] and box_err <= TOL["det_box_px"]
            and row["detections"] > 0
        )
        rows.append(row)
    return {"canvas": shapes.det_canvas, "model": config.to_dict(), "rows": rows,
            "ok": all(r["ok"] for r in rows)}


def markdown_f(res: dict) -> str:
    head = ["impl", "detections", "same valid", "same labels", "box max err px", "score max err"]
    rows = [
        [r["impl"], r["detections"], r["valid_equal"], r["labels_equal"],
         _f(r["box_max_err_px"]), _f(r["score_max_err"])]
        for r in res["rows"]
    ]
    return _table(head, rows)


# ---------------------------------------------------------------- c: RoIAlign timing


def section_c(shapes: Shapes) -> dict:
    """Forward and forward+backward times of each implementation and torchvision's."""
    import jax

    from experiments import bench_ops

    feats, boxes = bench_ops.make_inputs(
        shapes.roi_batch, shapes.roi_num, shapes.roi_canvas, shapes.strides, shapes.roi_channels
    )
    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for dtype in shapes.time_dtypes:
        for out in shapes.roi_outs:
            row = {"dtype": dtype, "out": out}
            for impl in bench_ops.IMPLS:
                row[impl] = bench_ops.time_impl(
                    impl, feats, boxes, out, shapes.strides, shapes.repeats, dtype
                )
            tv = bench_ops.time_torchvision(
                feats, boxes, out, shapes.strides, shapes.roi_canvas, shapes.repeats, dtype,
                require_cuda=not on_cpu,
            )
            row["torchvision"] = tv
            ref = row["reference"]
            row["pallas_fwd_speedup"] = ref["fwd_s"] / row["pallas"]["fwd_s"]
            if tv is not None:
                row["pallas_fb_over_torchvision"] = row["pallas"]["fb_s"] / tv["fb_s"]
            rows.append(row)
    return {"rows": rows}


def markdown_c(res: dict) -> str:
    head = ["dtype", "out"]
    for impl in ("reference", "pallas", "einsum"):
        head += [f"{impl} fwd ms", f"{impl} f+b ms", f"{impl} f+b MB"]
    head += ["torchvision fwd ms", "torchvision f+b ms"]
    rows = []
    for r in res["rows"]:
        cells = [r["dtype"], f"{r['out']}x{r['out']}"]
        for impl in ("reference", "pallas", "einsum"):
            t = r[impl]
            cells += [_f(t["fwd_s"] * 1e3), _f(t["fb_s"] * 1e3), _f(t["fb_mem_mb"], "{:.0f}")]
        tv = r["torchvision"]
        cells += [_f(tv["fwd_s"] * 1e3) + f" ({tv['device']})", _f(tv["fb_s"] * 1e3)] if tv else [
            "-", "-"]
        rows.append(cells)
    return _table(head, rows)


# ---------------------------------------------------------------- d: train step


def synthetic_scene(rng, image_hw: tuple[int, int], num: int, num_classes: int):
    """Boxes [num, 4] xyxy (10..40% of the shorter side) and labels [num] 1..K-1."""
    import numpy as np

    h, w = image_hw
    side = np.exp(rng.uniform(np.log(0.1 * min(h, w)), np.log(0.4 * min(h, w)), size=(num, 2)))
    x0 = rng.uniform(0, w - side[:, 0])
    y0 = rng.uniform(0, h - side[:, 1])
    boxes = np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], -1).astype(np.float32)
    labels = rng.integers(1, num_classes, size=num).astype(np.int32)
    return boxes, labels


def synthetic_train_batch(
    batch: int, canvas, image_hw, max_instances: int, mask_size: int, num: int, num_classes: int,
    seed: int = 0,
) -> dict:
    """A COCO-like train batch (``maskrcnn_jax.batch`` layout, TRAIN_KEYS).

    Each image [h, w] of random pixels sits top-left in the [H, W] canvas and
    holds ``num`` instances whose masks are the ellipses inscribed in their
    boxes (box-cropped, [S, S]).
    """
    import numpy as np

    from maskrcnn_jax.batch import TRAIN_KEYS, zeros_batch

    rng = np.random.default_rng(seed)
    out = zeros_batch(batch, canvas, max_instances, mask_size, keys=TRAIN_KEYS)
    h, w = image_hw
    t = (np.arange(mask_size) + 0.5) / mask_size * 2 - 1
    ellipse = ((t[:, None] ** 2 + t[None, :] ** 2) <= 1).astype(np.uint8)
    for i in range(batch):
        out["image"][i, :h, :w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        out["image_size"][i] = (h, w)
        boxes, labels = synthetic_scene(rng, image_hw, num, num_classes)
        out["boxes"][i, :num] = boxes
        out["labels"][i, :num] = labels
        out["masks"][i, :num] = ellipse
        out["valid"][i, :num] = True
    return out


def make_train_step(model, config, optimizer):
    """(params, constants, opt_state, step, batch) -> (params, opt_state, loss).

    The update of ``maskrcnn_jax.train.make_train_step`` (the five losses of
    ``MaskRCNN.losses``, their gradient, the optax update, skipped when not
    finite) without its TrainState: that module imports the data stack.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from maskrcnn_jax.modeling import MaskRCNN

    def step(params, constants, opt_state, i, batch):
        key = jax.random.fold_in(jax.random.key(0), i)

        def loss_fn(p):
            variables = {"params": p, **({"constants": constants} if constants else {})}
            terms = model.apply(
                variables, batch["image"], batch["image_size"], batch, key, method=MaskRCNN.losses
            )
            return sum(terms.values())

        loss, grads = jax.value_and_grad(loss_fn)(params)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        return keep(new_params, params), keep(new_opt, opt_state), loss

    return step


def _device_bytes_limit() -> float:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    return float(stats.get("bytes_limit", float("inf")))


def _compiled_mb(compiled) -> float:
    from experiments.bench_ops import _memory_bytes

    return _memory_bytes(compiled) / 2**20


def _time_calls(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def _torchvision_worker(spec: dict, timeout: float) -> dict:
    """Runs :func:`torchvision_run` in a subprocess; its JSON, or ``{"error": ...}``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--torchvision-worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"torchvision worker timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def torchvision_run(spec: dict) -> dict:
    """torchvision's maskrcnn_resnet50_fpn, train step (AMP) or inference; in its own process.

    ``spec``: kind ('train' | 'infer'), batch, image [h, w], num, num_classes,
    steps. Images are not resized (min_size / max_size set to their size).
    """
    import numpy as np
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    h, w = spec["image"]
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=spec["num_classes"],
        min_size=min(h, w), max_size=max(h, w),
    ).to(dev)
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.uniform(0, 1, (3, h, w)).astype(np.float32)).to(dev)
              for _ in range(spec["batch"])]
    # AMP (float16 autocast + GradScaler) on CUDA; float32 on a CPU (the smoke run).
    amp = torch.autocast(dev, dtype=torch.float16, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if spec["kind"] == "train":
        yy, xx = np.mgrid[:h, :w]
        targets = []
        for _ in range(spec["batch"]):
            boxes, labels = synthetic_scene(rng, (h, w), spec["num"], spec["num_classes"])
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            rx, ry = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
            masks = (((xx[None] + 0.5 - cx[:, None, None]) / rx[:, None, None]) ** 2
                     + ((yy[None] + 0.5 - cy[:, None, None]) / ry[:, None, None]) ** 2) <= 1
            targets.append({
                "boxes": torch.from_numpy(boxes).to(dev),
                "labels": torch.from_numpy(labels.astype(np.int64)).to(dev),
                "masks": torch.from_numpy(masks.astype(np.uint8)).to(dev),
            })
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(dev, enabled=cuda)

        def call():
            with amp:
                loss = sum(model(images, targets).values())
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sync()
    else:
        model.eval()

        def call():
            with torch.no_grad(), amp:
                model(images)
            sync()

    call()
    step_s = _time_calls(call, spec["steps"])
    result = {"step_s": step_s, "img_per_s": spec["batch"] / step_s, "device": dev,
              "torch": torch.__version__}
    if cuda:
        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def section_d(shapes: Shapes, deadline: float) -> dict:
    """Train step img/s, compile time and memory for reference and pallas; torchvision AMP."""
    import jax
    import jax.numpy as jnp

    from maskrcnn_jax import optim
    from maskrcnn_jax.modeling import MaskRCNN

    config = load_experiment_config(shapes.train_experiment)
    config.model.dtype = "bfloat16"
    ds = config.dataset
    # The recipe's landscape canvas (dataset.aspect_canvases), else its one canvas.
    canvas = tuple(int(v) for v in (ds.aspect_canvases or (ds.image_size,))[0])
    image_hw = tuple(min(c, v) for c, v in zip(canvas, shapes.infer_image))
    num = min(shapes.train_instances, int(ds.max_instances))
    variables = init_variables(config.model)
    params, constants = variables["params"], variables.get("constants", {})
    optimizer = optim.make_optimizer(config, params)
    opt_state = optimizer.init(params)
    limit = _device_bytes_limit()

    impls = {}
    batch_size = shapes.train_batch
    for impl in shapes.train_impls:
        model_config = config.model.copy_and_resolve_references()
        model_config.roi_align_impl = impl
        step = make_train_step(MaskRCNN(model_config), config, optimizer)
        while True:
            batch = jax.device_put(synthetic_train_batch(
                batch_size, canvas, image_hw, ds.max_instances, ds.mask_size, num,
                config.model.num_classes))
            t0 = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0, 2)).lower(
                params, constants, opt_state, jnp.int32(0), batch).compile()
            compile_s = time.perf_counter() - t0
            mem = _compiled_mb(compiled)
            if mem * 2**20 <= limit or batch_size == 1 or impl != "reference":
                break
            batch_size //= 2  # the largest batch whose compiled step fits
        impls[impl] = {"compiled": compiled, "batch": batch, "compile_s": compile_s,
                       "step_mem_mb": mem}

    # torchvision first, while this process holds little device memory.
    tv = _torchvision_worker(
        {"kind": "train", "batch": batch_size, "image": image_hw, "num": num,
         "num_classes": int(config.model.num_classes), "steps": shapes.train_steps},
        timeout=deadline - time.monotonic(),
    )
    result = {"batch": batch_size, "canvas": canvas, "image": image_hw, "instances": num,
              "model": f"R{config.model.depth}-FPN {config.model.dtype}",
              "torchvision": tv, "impls": {}}
    for impl, r in impls.items():
        state = {"p": jax.tree.map(jnp.copy, params), "o": jax.tree.map(jnp.copy, opt_state)}
        losses = []

        def call():
            state["p"], state["o"], loss = r["compiled"](
                state["p"], constants, state["o"], jnp.int32(len(losses)), r["batch"])
            losses.append(loss)
            jax.block_until_ready(loss)

        call()
        step_s = _time_calls(call, shapes.train_steps)
        result["impls"][impl] = {
            "compile_s": r["compile_s"], "step_s": step_s, "img_per_s": batch_size / step_s,
            "step_mem_mb": r["step_mem_mb"], "loss": float(losses[-1]),
        }
        if "img_per_s" in tv:
            result["impls"][impl]["ratio_to_torchvision"] = (batch_size / step_s) / tv["img_per_s"]
    return result


def markdown_d(res: dict) -> str:
    tv = res["torchvision"]
    head = ["train step", "batch", "compile s", "img/s", "step memory MB", "ratio to torchvision"]
    rows = [
        [f"ours {impl} ({res['model']}, {res['canvas'][0]}x{res['canvas'][1]} canvas)",
         res["batch"], _f(r["compile_s"], "{:.1f}"), _f(r["img_per_s"], "{:.2f}"),
         _f(r["step_mem_mb"], "{:.0f}"), _f(r.get("ratio_to_torchvision"), "{:.2f}")]
        for impl, r in res["impls"].items()
    ]
    rows.append([f"torchvision AMP ({res['image'][0]}x{res['image'][1]})", res["batch"], "-",
                 _f(tv.get("img_per_s"), "{:.2f}"), _f(tv.get("max_memory_allocated_mb"),
                                                        "{:.0f}"), tv.get("error", "1.00")])
    return _table(head, rows)


# ---------------------------------------------------------------- e: inference


def section_e(shapes: Shapes, deadline: float) -> dict:
    """Inference img/s at each batch size, ours (bf16) against torchvision (AMP)."""
    import jax
    import numpy as np

    from maskrcnn_jax.modeling import MaskRCNN

    config = load_experiment_config(shapes.infer_experiment).model
    config.dtype = "bfloat16"
    variables = init_variables(config)
    model = MaskRCNN(config)
    h, w = shapes.infer_image
    rows = []
    for b in shapes.infer_batches:
        tv = _torchvision_worker(
            {"kind": "infer", "batch": b, "image": (h, w), "num": 0,
             "num_classes": int(config.num_classes), "steps": shapes.infer_steps},
            timeout=(deadline - time.monotonic()) / 2,
        )
        rng = np.random.default_rng(b)
        images = np.zeros((b, *shapes.infer_canvas, 3), np.uint8)
        images[:, :h, :w] = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        images = jax.device_put(images)
        sizes = jax.device_put(np.array([[h, w]] * b, np.int32))
        t0 = time.perf_counter()
        compiled = jax.jit(lambda v, x, s: model.apply(v, x, s)).lower(
            variables, images, sizes).compile()
        compile_s = time.perf_counter() - t0
        call = lambda: jax.block_until_ready(compiled(variables, images, sizes))
        call()
        step_s = _time_calls(call, shapes.infer_steps)
        row = {"batch": b, "compile_s": compile_s, "img_per_s": b / step_s,
               "mem_mb": _compiled_mb(compiled), "torchvision": tv}
        if "img_per_s" in tv:
            row["ratio_to_torchvision"] = row["img_per_s"] / tv["img_per_s"]
        rows.append(row)
    return {"image": shapes.infer_image, "canvas": shapes.infer_canvas,
            "roi_align_impl": config.roi_align_impl, "rows": rows}


def markdown_e(res: dict) -> str:
    head = ["inference batch", "ours img/s", "compile s", "torchvision AMP img/s", "ratio"]
    rows = [
        [r["batch"], _f(r["img_per_s"], "{:.2f}"), _f(r["compile_s"], "{:.1f}"),
         _f(r["torchvision"].get("img_per_s"), "{:.2f}"),
         _f(r.get("ratio_to_torchvision"), "{:.2f}")]
        for r in res["rows"]
    ]
    return _table(head, rows)


# ---------------------------------------------------------------- g: NMS


def section_g(shapes: Shapes) -> dict:
    """Loop against tiled NMS (bench_nms.run, which checks that both keep the same boxes)."""
    from experiments import bench_nms

    rows = bench_nms.run(
        sizes=shapes.nms_sizes, repeats=shapes.repeats, batch=shapes.nms_batch,
        tile_sizes=(shapes.nms_tile,), with_torch=True, rpn_recipe=False,
    )
    return {"rows": rows, "markdown": bench_nms.markdown_table(rows)}


def markdown_g(res: dict) -> str:
    return res["markdown"]


# ---------------------------------------------------------------- driver

# Seconds each section is expected to need on one H100 (a section starts only
# if that much of --budget-s is left).
EXPECTED_S = {"b": 40, "f": 40, "c": 60, "d": 150, "e": 90, "g": 30}
MARKDOWN = {"b": markdown_b, "f": markdown_f, "c": markdown_c, "d": markdown_d, "e": markdown_e,
            "g": markdown_g}


def run(sections: str, output: str, smoke: bool, budget_s: float) -> dict:
    """Runs ``sections`` (a always), writing ``output`` after each; returns the report."""
    start = time.monotonic()
    shapes = SMOKE if smoke else FULL
    report = Report(output, {"smoke": smoke, "sections": sections, "budget_s": budget_s,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    t0 = time.monotonic()
    report.add("a", dict(section_a(), wall_s=time.monotonic() - t0))
    a = report.data["sections"]["a"]
    print(f"device_check: {a['device_count']} x {a['device_kind']} ({a['backend']}), "
          f"jax {a['versions']['jax']}, jaxlib {a['versions']['jaxlib']}", flush=True)
    for name in SECTIONS[1:]:
        if name not in sections:
            continue
        left = budget_s - (time.monotonic() - start)
        if not smoke and left < EXPECTED_S[name]:
            report.add(name, {"skipped": f"{left:.0f} s of the budget left"})
            print(f"section {name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        # Subprocess time limits; the smoke run checks the path, whatever the machine's load.
        deadline = time.monotonic() + (max(left, 900.0) if smoke else left)
        t0 = time.monotonic()
        try:
            if name in "de":
                res = globals()[f"section_{name}"](shapes, deadline)
            else:
                res = globals()[f"section_{name}"](shapes)
        except Exception as e:  # report and go on: later sections still measure
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "traceback": traceback.format_exc()[-6000:]}
            traceback.print_exc()
        res["wall_s"] = time.monotonic() - t0
        report.add(name, res)
        print(f"\nsection {name} ({res['wall_s']:.0f} s)", flush=True)
        print(res["error"] if "error" in res else MARKDOWN[name](res), flush=True)
    loaded = sorted(m for m in DATA_STACK if m in sys.modules)
    report.data["meta"]["data_stack_modules_loaded"] = loaded
    report.data["meta"]["wall_s"] = time.monotonic() - start
    report.write()
    print(f"\nreport: {output} ({report.data['meta']['wall_s']:.0f} s)")
    return report.data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="device_check.json")
    p.add_argument("--sections", default=SECTIONS, help=f"letters of {SECTIONS} (a always runs)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, the same code")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--torchvision-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torchvision_worker:
        print(json.dumps(torchvision_run(json.loads(args.torchvision_worker))))
        return 0
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        print(f"device_check: unknown sections {''.join(bad)}; choose from {SECTIONS}",
              file=sys.stderr)
        return 2
    missing = missing_packages()
    if missing:
        print(missing_message(missing), file=sys.stderr)
        return 2
    if args.smoke:
        # Cheaper CPU code generation: the smoke run checks the path, not speed.
        flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        import jax

        jax.config.update("jax_platforms", "cpu")
    run(args.sections, args.output, args.smoke, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
