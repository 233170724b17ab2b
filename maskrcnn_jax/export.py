"""Export a checkpoint as a portable artifact: ``jax.export`` per padding bucket + params.

    python -m maskrcnn_jax.export --checkpoint CKPT_OR_WORKDIR --output DIR \\
        [--platforms cpu,cuda,tpu] [--batch_size 1]

Writes into ``DIR`` (read back by ``serving.ExportedPredictor``, which needs
only jax + numpy):

- ``bucket_<H>x<W>.jax``: the jitted inference (``MaskRCNN.__call__``) for a
  ``[batch_size, H, W, 3]`` float32 input, serialised with
  ``jax.export`` (StableHLO) for every platform named, one per padding bucket
  of ``Predictor`` (``host_processing.default_buckets``). The variables are
  its first *argument*, not constants, so they are stored once;
- ``params.npz``: those variables, one array per ``/``-joined tree path;
- ``export.json``: format version, platforms, batch size, buckets, min/max
  size, ``size_divisible``, num_classes, class names, category ids, the full
  model config, versions of jax / jaxlib / maskrcnn_jax, the checkpoint's
  path and step, and each file's size and SHA-256.

RoIAlign is pinned to a portable implementation: the checkpoint's
``roi_align_impl`` if it is ``reference`` or ``einsum``, else ``reference``
(``auto`` resolves from the *exporting* backend and ``pallas`` lowers to a
Triton call that neither CPU nor TPU can run).

Exit status 0; 2 for a bad checkpoint, bad flags or a platform that cannot be
lowered here (one line on stderr). The dashed flag spellings
(``--batch-size``) are accepted too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import cli_flags, serving
from maskrcnn_jax.host_processing import check_buckets

# RoIAlign implementations whose lowering is plain XLA on every platform.
PORTABLE_ROI_ALIGN = ("reference", "einsum")


def parse_platforms(text: str) -> tuple[str, ...]:
    """``"cpu,cuda"`` -> ``("cpu", "cuda")``.

    Raises:
      ValueError: one line listing the valid names, for an unknown or empty one.
    """
    names = tuple(p.strip().lower() for p in text.split(","))
    valid = ", ".join(serving.PLATFORMS)
    for name in names:
        if name not in serving.PLATFORMS:
            raise ValueError(f"unknown platform {name!r} in --platforms; valid: {valid}")
    if len(set(names)) != len(names):
        raise ValueError(f"--platforms names a platform twice: {text!r}")
    return names


def portable_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``model_config`` with ``roi_align_impl`` pinned to a portable implementation."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    if config.get("roi_align_impl") not in PORTABLE_ROI_ALIGN:
        config.roi_align_impl = "reference"
    return config


def flatten_params(variables: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Variables -> ``({"params/a/b": array}, {path: dtype})`` for ``np.savez``.

    Arrays whose dtype numpy cannot store (bfloat16 ...) are stored as raw
    unsigned integers of the same width, their dtype listed in the second dict.
    """
    flat, dtypes = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        array = np.asarray(leaf)
        if array.dtype.kind == "V" or array.dtype.name not in np.sctypeDict:
            dtypes[key] = array.dtype.name
            array = array.view(f"uint{array.dtype.itemsize * 8}")
        flat[key] = array
    return flat, dtypes


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_model(
    variables: Any,
    model_config: ml_collections.ConfigDict,
    output: str,
    platforms: Sequence[str] = serving.PLATFORMS,
    batch_size: int = 1,
    buckets: Sequence[Sequence[int]] | None = None,
    checkpoint: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Serialises inference for each bucket and platform into ``output``.

    Args:
      variables: ``{"params": ..., "constants": ...}``.
      model_config: the model's config (``roi_align_impl`` is pinned, see module doc).
      output: directory to write (created; existing artifact files replaced).
      platforms: ``jax.export`` platforms, some of ``serving.PLATFORMS``.
      batch_size: the exported batch dimension B (images per call).
      buckets: padded (H, W) sizes; default ``Predictor``'s.
      checkpoint: ``{"path": ..., "step": ...}`` recorded in the manifest.
      log: receives progress lines.

    Returns:
      The manifest written to ``output/export.json``.

    Raises:
      ValueError: unknown platform, bad batch size or buckets, or a lowering
        that fails for a platform (one line naming it).
    """
    from maskrcnn_jax.modeling import MaskRCNN

    log = log or (lambda _: None)
    platforms = tuple(platforms)
    parse_platforms(",".join(platforms))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = portable_config(model_config)
    c = config
    buckets = check_buckets(buckets, c.min_size, c.max_size, c.size_divisible)
    os.makedirs(output, exist_ok=True)
    forward = jax.jit(MaskRCNN(config).apply)
    params_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)
    files: dict[str, dict[str, Any]] = {}

    def record(name: str) -> None:
        path = os.path.join(output, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": serving.sha256_of(path)}

    flat, dtypes = flatten_params(variables)
    np.savez(os.path.join(output, serving.PARAMS_FILE), **flat)
    record(serving.PARAMS_FILE)
    for i, (h, w) in enumerate(buckets):
        start = time.perf_counter()
        images = jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32)
        sizes = jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)
        try:
            exported = jax.export.export(forward, platforms=platforms)(params_spec, images, sizes)
        except Exception as e:  # name the bucket and platforms on one line
            message = " ".join(str(e).split())[:300]
            raise ValueError(
                f"cannot lower bucket {h}x{w} for platforms {','.join(platforms)}: "
                f"{type(e).__name__}: {message}"
            ) from None
        name = serving.bucket_file(h, w)
        with open(os.path.join(output, name), "wb") as f:
            f.write(exported.serialize())
        record(name)
        log(
            f"[{i + 1}/{len(buckets)}] bucket {h}x{w}: {files[name]['bytes'] / 1e6:.2f} MB "
            f"({time.perf_counter() - start:.1f}s)"
        )
    config_dict = json.loads(config.to_json())
    manifest = {
        "format": serving.FORMAT,
        "format_version": serving.FORMAT_VERSION,
        "platforms": list(platforms),
        "batch_size": int(batch_size),
        "buckets": [list(b) for b in buckets],
        "min_size": int(c.min_size),
        "max_size": int(c.max_size),
        "size_divisible": int(c.size_divisible),
        "num_classes": int(c.num_classes),
        "class_names": config_dict.get("class_names"),
        "category_ids": config_dict.get("category_ids"),
        "roi_align_impl": c.roi_align_impl,
        "calling_convention_version": exported.calling_convention_version,
        "inputs": {
            "variables": "params.npz, nested by '/'-joined path",
            "images": "[batch_size, H, W, 3] float32 RGB 0..255, resized image top-left",
            "image_sizes": "[batch_size, 2] int32 (h, w) of each resized image",
        },
        "outputs": "boxes [B, D, 4] xyxy resized px, scores [B, D], labels [B, D] int32, "
        "masks [B, D, 28, 28] box-frame probabilities, valid [B, D] bool",
        "param_dtypes": dtypes,
        "versions": {
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "maskrcnn_jax": _version("maskrcnn_jax"),
        },
        "checkpoint": checkpoint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_config": config_dict,
        "files": files,
    }
    with open(os.path.join(output, serving.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def export_checkpoint(
    checkpoint: str,
    output: str,
    platforms: Sequence[str] = serving.PLATFORMS,
    batch_size: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`export_model` of a checkpoint dir or training work dir (its latest step).

    Raises:
      checkpoint.CheckpointError: ``checkpoint`` is not a checkpoint (one line).
    """
    from maskrcnn_jax.checkpoint import load_model, resolve_checkpoint

    step_dir = resolve_checkpoint(checkpoint)
    variables, config = load_model(step_dir)
    step = os.path.basename(step_dir)
    info = {"path": step_dir, "step": int(step) if step.isdigit() else None}
    return export_model(variables, config, output, platforms, batch_size, checkpoint=info, log=log)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_flags.ArgumentParser(
        prog="python -m maskrcnn_jax.export",
        description="Export a Mask R-CNN checkpoint with jax.export (one artifact, several "
        "platforms), runnable by maskrcnn_jax.serving.ExportedPredictor.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or training work dir")
    parser.add_argument("--output", required=True, help="artifact directory to write")
    parser.add_flag(
        "--platforms",
        default=",".join(serving.PLATFORMS),
        help=f"comma-separated, some of {','.join(serving.PLATFORMS)} (default: all)",
    )
    parser.add_flag("--batch_size", type=int, default=1, help="images per exported call")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    try:
        args.platforms = parse_platforms(args.platforms)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = export_checkpoint(
            args.checkpoint, args.output, args.platforms, args.batch_size,
            log=lambda line: print(line, file=sys.stderr),
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(
        f"exported {len(manifest['buckets'])} bucket(s) x batch {manifest['batch_size']} for "
        f"{','.join(manifest['platforms'])}: {total / 1e6:.1f} MB -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
