"""The Mask R-CNN paper's Table 2 ablations on the CPU shapes config, as one command.

Trains ``experiments/shapes.py`` once per variant with the same seed, data and
step budget, evaluates each with pycocotools, and writes ``ablations.md`` (a
table) and ``ablations.png`` (a bar chart of mask AP) into ``--workdir``:

- ``align``: RoIAlign, torchvision's ``aligned=False`` (the baseline);
- ``pool``: RoIPool for the box and mask heads' features (Table 2c);
- ``align_v2``: RoIAlign with ``aligned=True`` (Detectron2's ROIAlignV2);
- ``softmax``: a per-pixel softmax over the class channels (Table 2b);
- ``class_agnostic``: one sigmoid mask channel for every class (Table 2b).

``align`` and ``pool`` run once per seed of ``--seeds``, the others with the
first seed only, so that the table shows the seed-to-seed noise next to the
differences between variants.

Run (the full ablation; budget: choose ``--steps`` so that the 7 runs fit the
time you have, see README "Ablations"):
  python -m experiments.ablations --workdir runs/ablations --steps 500

Smoke run (tiny model, seconds per variant once compiled):
  python -m experiments.ablations --workdir /tmp/ablations --config experiments/tiny.py \\
      --steps 2 --variants align,pool --seeds 0

Each run trains in ``WORKDIR/<variant>_seed<seed>/`` and records its result
there (``result.json``); a rerun reuses finished runs of the same budget, so
an interrupted ablation resumes. All runs share one prepared dataset
(``WORKDIR/data`` unless the config or ``MASKRCNN_JAX_DATA_DIR`` names one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from maskrcnn_jax.modeling.config import validate_config
from maskrcnn_jax.train import TrainingError, train_and_evaluate

# Model config overrides of each variant, in table order.
VARIANTS: dict[str, dict[str, Any]] = {
    "align": {},
    "pool": {"roi_pooler": "pool"},
    "align_v2": {"roi_pooler": "align_v2"},
    "softmax": {"mask_loss": "softmax"},
    "class_agnostic": {"class_agnostic_mask": True},
}
# Variants run with every seed of --seeds (the others with the first only).
REPEATED = ("align", "pool")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.py")
METRICS = ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")

# He et al. (2017), Table 2, ResNet-50-C4 on COCO minival: mask AP.
PAPER_TABLE2 = (
    ("RoIPool, stride 16 (Table 2c)", 26.9),
    ("RoIAlign, stride 16 (Table 2c)", 30.2),
    ("RoIPool, stride 32 (Table 2d)", 23.6),
    ("RoIAlign, stride 32 (Table 2d)", 30.9),
    ("softmax masks (Table 2b)", 24.8),
    ("sigmoid masks (Table 2b)", 30.3),
    ("class-agnostic masks (Table 2b)", 29.7),
)


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the experiment config file at ``path``.

    Raises:
      ValueError: one line, if the file is missing or has no ``get_config``.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location("_ablation_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: defines no get_config()")
    return module.get_config()


def runs(variants: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(variant, seed) pairs in table order: each variant's first seed, then repeats."""
    first = [(v, seeds[0]) for v in variants]
    return first + [(v, s) for s in seeds[1:] for v in variants if v in REPEATED]


def variant_config(
    base: ml_collections.ConfigDict, variant: str, seed: int, steps: int, data_dir: str
) -> ml_collections.ConfigDict:
    """``base`` with ``variant``'s model overrides, ``seed`` and a budget of ``steps``.

    The learning-rate schedule (warm-up and decay steps) is scaled with the
    budget, so a shorter run follows the same schedule shape. Evaluation runs
    once, at the end, on the whole validation split; no pictures.
    """
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in VARIANTS[variant].items():
        config.model[key] = value
    old = int(config.train.steps)
    scale = steps / old
    config.train.steps = steps
    config.train.warmup_steps = int(round(config.train.warmup_steps * scale))
    config.train.decay_steps = tuple(max(1, round(s * scale)) for s in config.train.decay_steps)
    config.seed = seed
    config.eval_every = 0
    config.eval_at_end = True
    config.eval_max_images = 0
    config.num_pictures = 0
    config.checkpoint_every = steps
    if not config.dataset.data_dir and not os.environ.get("MASKRCNN_JAX_DATA_DIR"):
        config.dataset.data_dir = data_dir
    validate_config(config.model)
    return config


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and the number of cores JAX sees."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def run_variant(
    base: ml_collections.ConfigDict, variant: str, seed: int, steps: int, workdir: str
) -> dict[str, Any]:
    """Trains and evaluates one variant in ``workdir/<variant>_seed<seed>``; its result row."""
    run_dir = os.path.join(workdir, f"{variant}_seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            done = json.load(f)
        if done.get("steps") == steps:
            logging.info("%s seed %d: reusing %s", variant, seed, result_path)
            return done
    config = variant_config(base, variant, seed, steps, os.path.join(workdir, "data"))
    start = time.perf_counter()
    final = train_and_evaluate(config, run_dir)
    seconds = time.perf_counter() - start
    row = {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "cpu": cpu_model(),
        **{k: float(final[k]) for k in METRICS},
    }
    with open(result_path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def write_table(rows: Sequence[Mapping[str, Any]], path: str, config_path: str) -> None:
    """``ablations.md``: one row per run, AP in percent, plus the paper's numbers."""
    lines = [
        "# Mask R-CNN ablations on the shapes dataset",
        "",
        f"Config `{os.path.relpath(config_path)}`; every run has the same data, "
        "step budget and schedule. AP in percent (pycocotools, validation split). "
        "Time: wall clock of training plus the final evaluation, compilation included.",
        "",
        "| variant | seed | segm AP | segm AP50 | segm AP75 | bbox AP | time (s) | steps | CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        aps = " | ".join(f"{100 * r[k]:.1f}" for k in METRICS)
        lines.append(
            f"| {r['variant']} | {r['seed']} | {aps} | {r['seconds']:.0f} | {r['steps']} "
            f"| {r['cpu']} |"
        )
    lines += ["", "The paper (He et al., 2017, Table 2; ResNet-50-C4, COCO), mask AP:", ""]
    lines += ["| setting | mask AP |", "|---|---|"]
    lines += [f"| {name} | {ap} |" for name, ap in PAPER_TABLE2]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def draw_chart(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """``ablations.png``: a bar per run of segm AP (and a thin bar of segm AP75)."""
    from PIL import Image, ImageDraw

    bar, gap, left, top, height = 36, 18, 60, 40, 300
    width = left + len(rows) * (bar + gap) + gap
    image = Image.new("RGB", (max(width, 320), top + height + 70), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), "segm AP (wide) and AP75 (narrow), %", fill="black")
    top_ap = max([100 * r[k] for r in rows for k in ("segm_AP", "segm_AP75")] + [1.0])
    scale = height / (top_ap * 1.1)
    base_y = top + height
    draw.line((left, top, left, base_y), fill="black")
    draw.line((left, base_y, width, base_y), fill="black")
    for tick in range(0, int(top_ap * 1.1) + 1, max(1, int(top_ap * 1.1) // 5)):
        y = base_y - tick * scale
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 30, y - 6), str(tick), fill="black")
    colors = {"align": "#1f77b4", "pool": "#d62728", "align_v2": "#2ca02c"}
    for i, r in enumerate(rows):
        x = left + gap + i * (bar + gap)
        color = colors.get(r["variant"], "#9467bd")
        ap, ap75 = 100 * r["segm_AP"], 100 * r["segm_AP75"]
        draw.rectangle((x, base_y - ap * scale, x + bar, base_y), fill=color)
        narrow = (x + bar // 3, base_y - ap75 * scale, x + 2 * bar // 3, base_y)
        draw.rectangle(narrow, fill="black")
        draw.text((x, base_y - max(ap, ap75) * scale - 14), f"{ap:.1f}", fill="black")
        draw.text((x, base_y + 6), r["variant"][:9], fill="black")
        draw.text((x, base_y + 20), f"s{r['seed']}", fill="black")
    image.save(path)


def parse_list(text: str, what: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise ValueError(f"--{what}: unknown {bad}, expected names from {tuple(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where runs, table and chart go")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment config file")
    parser.add_argument("--steps", type=int, default=0, help="per run; 0 = the config's")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", default="0,1", help="align and pool run with each")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        variants = parse_list(args.variants, "variants", tuple(VARIANTS))
        try:
            seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
        except ValueError as e:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from e
        base = load_config(args.config)
        steps = args.steps or int(base.train.steps)
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        for variant in variants:  # every config error before the first compilation
            variant_config(base, variant, seeds[0], steps, args.workdir)
        os.makedirs(args.workdir, exist_ok=True)
        rows = [run_variant(base, v, s, steps, args.workdir) for v, s in runs(variants, seeds)]
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = os.path.join(args.workdir, "ablations.md")
    write_table(rows, table, args.config)
    draw_chart(rows, os.path.join(args.workdir, "ablations.png"))
    with open(table) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
