"""Run an exported Mask R-CNN (``python -m maskrcnn_jax.export``) with jax + numpy only.

    predictor = ExportedPredictor("exported/")
    [result] = predictor([image])  # image: HxWx3 uint8 RGB
    result["boxes"], result["scores"], result["labels"], result["masks"]

The call and its outputs are those of ``inference.Predictor`` (the host-side
resize, padding and mask pasting are the same code,
:mod:`maskrcnn_jax.host_processing`); the device call is the deserialised
``jax.export`` function of the image's padding bucket, with the parameters of
``params.npz`` as its first argument. Importing this module imports neither
Flax, optax, orbax, tensorflow_datasets nor grain.

An artifact directory holds (see ``export.py``):

- ``export.json``: the manifest (format, platforms, batch size, buckets, resize
  settings, class names, category ids, versions, checkpoint, file digests);
- ``params.npz``: the variables, one array per ``/``-joined tree path;
- ``bucket_<H>x<W>.jax``: one serialised ``jax.export.Exported`` per bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from maskrcnn_jax import xla_options
from maskrcnn_jax.host_processing import BucketedPredictor

FORMAT = "maskrcnn_jax.export"
FORMAT_VERSION = 1
MANIFEST = "export.json"
PARAMS_FILE = "params.npz"
# jax.export platform names this project exports for.
PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
    """An artifact directory that cannot be used (missing, truncated, foreign, wrong platform)."""


def bucket_file(height: int, width: int) -> str:
    """File name of the exported function of bucket (H, W)."""
    return f"bucket_{height}x{width}.jax"


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_platform() -> str:
    """The default backend as ``jax.export`` names platforms: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"params/fpn/inner_0/kernel": array, ...}`` -> the nested variables dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def read_manifest(directory: str) -> dict[str, Any]:
    """The parsed ``export.json`` of an artifact directory.

    Raises:
      ExportError: naming the directory or file when it is missing or not a
        maskrcnn_jax export manifest.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ExportError(f"{directory}: no such exported-model directory")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: missing (not a directory written by maskrcnn_jax.export)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not a JSON manifest ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a maskrcnn_jax export manifest (format != {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}"
        )
    return manifest


def _checked_file(directory: str, name: str, manifest: dict[str, Any]) -> str:
    """Path of an artifact file whose size and digest match the manifest."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: missing from the exported model")
    expected = manifest.get("files", {}).get(name)
    if expected is None:
        raise ExportError(f"{path}: not listed in {MANIFEST} (foreign file?)")
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        raise ExportError(f"{path}: {size} bytes, expected {expected['bytes']} (truncated?)")
    if sha256_of(path) != expected["sha256"]:
        raise ExportError(f"{path}: contents differ from {MANIFEST}'s sha256 (corrupt or replaced)")
    return path


def load_params(directory: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The variables of an artifact, as a nested dict of numpy arrays (dtypes restored)."""
    path = _checked_file(directory, PARAMS_FILE, manifest)
    dtypes = manifest.get("param_dtypes", {})
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except Exception as e:  # zipfile / numpy raise many kinds; name the file once
        raise ExportError(f"{path}: cannot read parameters ({type(e).__name__}: {e})") from None
    for key, name in dtypes.items():  # stored as raw bits (e.g. bfloat16 as uint16)
        flat[key] = flat[key].view(jax.numpy.dtype(name))
    return unflatten_params(flat)


class ExportedPredictor(BucketedPredictor):
    """``inference.Predictor``'s call on an exported artifact: no Flax, no model code.

    Args:
      directory: written by ``python -m maskrcnn_jax.export``.
      mask_threshold: if set, masks are returned as ``probability > threshold`` bool.

    The batch size and buckets are the artifact's (they are baked into the
    exported shapes). Functions are deserialised on first use of a bucket.

    Raises:
      ExportError: one line naming the file, for a missing, truncated or
        foreign artifact, or one serialised for platforms without this backend.
    """

    def __init__(self, directory: str, mask_threshold: float | None = None):
        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        self.directory = directory
        self.manifest = manifest
        platforms = tuple(manifest.get("platforms", ()))
        here = current_platform()
        if here not in platforms:
            raise ExportError(
                f"{os.path.join(directory, MANIFEST)}: exported for platforms "
                f"{', '.join(platforms)}; this process runs on {here}"
            )
        super().__init__(
            manifest["min_size"],
            manifest["max_size"],
            manifest["size_divisible"],
            [tuple(b) for b in manifest["buckets"]],
            manifest["batch_size"],
            mask_threshold,
        )
        # Check every function file now (cheap): a bad artifact fails at load, not mid-stream.
        self._paths = {
            (h, w): _checked_file(directory, bucket_file(h, w), manifest) for h, w in self.buckets
        }
        self.variables = jax.device_put(load_params(directory, manifest))
        self._exported: dict[tuple[int, int], Any] = {}
        self._calls: dict[tuple[int, int], Any] = {}  # jitted exp.call per bucket

    @property
    def model_config(self) -> dict[str, Any]:
        """What evaluation and drawing need: num_classes, class_names, category_ids, sizes."""
        m = self.manifest
        keys = ("num_classes", "class_names", "category_ids", "min_size", "max_size")
        return {k: m.get(k) for k in (*keys, "size_divisible")}

    @property
    def platforms(self) -> tuple[str, ...]:
        """The platforms the artifact was exported for."""
        return tuple(self.manifest["platforms"])

    def exported(self, bucket: Sequence[int]) -> Any:
        """The deserialised ``jax.export.Exported`` of a bucket (H, W)."""
        key = (int(bucket[0]), int(bucket[1]))
        if key not in self._exported:
            path = self._paths[key]
            with open(path, "rb") as f:
                data = bytearray(f.read())
            try:
                exp = jax.export.deserialize(data)
            except Exception as e:  # flatbuffers raises many kinds
                raise ExportError(f"{path}: not a serialised jax.export function ({e})") from None
            expected = jax.tree.structure(((self.variables, 0, 0), {}))
            if exp.in_tree != expected:
                raise ExportError(f"{path}: its parameters differ from {PARAMS_FILE}'s")
            self._exported[key] = exp
            self._calls[key] = xla_options.jit(exp.call)
        return self._exported[key]

    def run_batch(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        """One device call on padded images [B, H, W, 3] float32 0..255 and sizes [B, 2]."""
        self.exported(images.shape[1:3])
        out = self._calls[tuple(images.shape[1:3])](self.variables, np.asarray(images, np.float32),
                       np.asarray(image_sizes, np.int32))  # fmt: skip
        return jax.device_get(out)


def load_predictor(checkpoint: str | None, exported: str | None, batch_size: int) -> Any:
    """What the CLIs run: a :class:`ExportedPredictor` of the artifact ``exported``, else
    ``inference.Predictor`` of ``checkpoint`` at ``batch_size`` (imports the model then).

    Both answer ``predict(images)`` alike (``host_processing.BucketedPredictor``).
    """
    if exported is not None:
        return ExportedPredictor(exported)
    from maskrcnn_jax.inference import Predictor

    return Predictor.from_checkpoint(checkpoint, batch_size=batch_size)
