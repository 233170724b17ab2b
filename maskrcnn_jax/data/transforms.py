"""Per-example preprocessing: decode, flip, resize (or LSJ), pad, fixed-size instances.

Pure numpy/PIL, one example at a time; the input pipeline maps it over the
data source in grain workers. The geometry is a single map from source pixels
to network-input pixels (:class:`Geometry`): optional horizontal flip, resize
by ``(sx, sy)``, then a crop offset (LSJ only), with the result placed at the
top-left of a zero-padded ``[H, W]`` canvas (one per orientation with
``aspect_canvases``, :meth:`InputSpec.canvas_for`). Boxes go through that map;
masks are never resized at full size: each kept instance's mask is sampled
directly from the decoded source mask at the cells of its output box (see
``mask_crop.py``).

Output of :func:`preprocess`: one example of the batch spec in
``maskrcnn_jax/batch.py`` (keys, shapes, dtypes and padding values are
defined there).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from maskrcnn_jax import batch
from maskrcnn_jax.data import images, mask_crop, masks
from maskrcnn_jax.data.features import objects_as_arrays

logger = logging.getLogger(__name__)

# After an LSJ crop cuts a box, it is kept only if at least this wide and high.
MIN_CUT_BOX_SIDE = 1.0


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Static preprocessing options (from the dataset config).

    Attributes:
      image_size: (H, W) padded network input (the one canvas without
        ``aspect_canvases``).
      aspect_canvases: () or ((H, W) landscape, (H, W) portrait): train-time
        canvases by orientation (``h <= w`` is landscape); see
        :meth:`canvas_for`.
      scales: train shorter-side choices; without augmentation, the largest.
      max_size: longer-side cap.
      flip: random horizontal flip at train time.
      lsj: large-scale jitter at train time instead of scales/max_size.
      lsj_min_scale: LSJ scale range, relative to fitting image_size.
      lsj_max_scale: see lsj_min_scale.
      max_instances: M, instance slots per image.
      mask_size: S, side of the box-cropped masks.
      image_dtype: 'uint8' or 'float32'.
    """

    image_size: tuple[int, int] = (128, 128)
    aspect_canvases: tuple[tuple[int, int], ...] = ()
    scales: tuple[int, ...] = (128,)
    max_size: int = 128
    flip: bool = True
    lsj: bool = False
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0
    max_instances: int = 100
    mask_size: int = 56
    image_dtype: str = "uint8"

    def __post_init__(self):
        if not self.scales or min(self.scales) < 1 or self.max_instances < 1:
            raise ValueError(f"bad scales / max_instances in {self}")
        h, w = self.image_size
        if not self.aspect_canvases and not self.lsj and self.max_size > min(h, w):
            raise ValueError(
                f"dataset.max_size={self.max_size} does not fit the canvas dataset.image_size="
                f"{self.image_size}: a resized image's longer side can be max_size in either "
                "orientation; enlarge image_size or lower max_size"
            )
        if self.aspect_canvases:
            self._check_aspect_canvases()
        if self.image_dtype not in ("uint8", "float32"):
            raise ValueError(f"image_dtype must be 'uint8' or 'float32', got {self.image_dtype!r}")
        if not 0 < self.lsj_min_scale <= self.lsj_max_scale:
            raise ValueError(f"need 0 < lsj_min_scale <= lsj_max_scale in {self}")

    def _check_aspect_canvases(self) -> None:
        canvases = self.aspect_canvases
        if self.lsj:
            raise ValueError(
                f"dataset.aspect_canvases={canvases} with dataset.lsj.enabled: large-scale "
                "jitter crops to the one canvas dataset.image_size; set aspect_canvases=()"
            )
        if len(canvases) != 2 or any(len(c) != 2 or min(c) < 1 for c in canvases):
            raise ValueError(
                f"dataset.aspect_canvases={canvases}: expected () or two (H, W) canvases, "
                "landscape then portrait, e.g. ((800, 1344), (1344, 800))"
            )
        # The largest resized image of each orientation: short side at most the
        # largest scale (and at most max_size), long side at most max_size.
        short = min(max(self.scales), self.max_size)
        for name, (h, w), need in (
            ("landscape", canvases[0], (short, self.max_size)),
            ("portrait", canvases[1], (self.max_size, short)),
        ):
            if h < need[0] or w < need[1]:
                raise ValueError(
                    f"dataset.aspect_canvases {name} canvas {(h, w)} cannot hold a resized "
                    f"{name} image of up to {need[0]}x{need[1]} (dataset.scales max "
                    f"{max(self.scales)}, dataset.max_size={self.max_size}); enlarge it"
                )

    @property
    def canvases(self) -> tuple[tuple[int, int], ...]:
        """Every (H, W) a train batch can have: ``aspect_canvases``, else ``(image_size,)``."""
        return tuple(self.aspect_canvases) or (self.image_size,)

    def canvas_for(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) canvas of a source image: by orientation with ``aspect_canvases``.

        ``height <= width`` (square included) is landscape, the first canvas;
        otherwise portrait, the second. Without ``aspect_canvases``, ``image_size``.
        """
        if not self.aspect_canvases:
            return self.image_size
        return self.aspect_canvases[int(is_portrait(height, width))]

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> InputSpec:
        """From a dataset config (``get_dataset_config()``)."""
        return cls(
            image_size=tuple(int(v) for v in c.image_size),
            aspect_canvases=tuple(
                tuple(int(v) for v in canvas) for canvas in (c.get("aspect_canvases") or ())
            ),
            scales=tuple(int(v) for v in c.scales),
            max_size=int(c.max_size),
            flip=bool(c.flip),
            lsj=bool(c.lsj.enabled),
            lsj_min_scale=float(c.lsj.min_scale),
            lsj_max_scale=float(c.lsj.max_scale),
            max_instances=int(c.max_instances),
            mask_size=int(c.mask_size),
            image_dtype=str(c.image_dtype),
        )


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Source pixels -> network-input pixels.

    ``x_out = sx * (src_w - x if flip else x) - offset_x`` (same for y, no
    flip), kept inside ``[0, out_w] x [0, out_h]``.

    Attributes:
      src_h: source height.
      src_w: source width.
      flip: horizontal flip first.
      sx: horizontal resize factor (resized width / source width).
      sy: vertical resize factor.
      offset_x: crop offset in resized pixels (LSJ; else 0).
      offset_y: see offset_x.
      out_h: height of the (cropped) resized image inside the padding.
      out_w: its width.
      scale: nominal resize factor (what ``scale`` in the batch reports).
    """

    src_h: int
    src_w: int
    flip: bool
    sx: float
    sy: float
    offset_x: int
    offset_y: int
    out_h: int
    out_w: int
    scale: float


def sample_geometry(
    src_h: int, src_w: int, spec: InputSpec, train: bool, rng: np.random.Generator | None
) -> Geometry:
    """Draws the flip / scale / crop of one example.

    Train: flip with probability 1/2 (if ``spec.flip``); shorter side from
    ``spec.scales`` with the longer side capped at ``max_size`` (Detectron2's
    ResizeShortestEdge), or with ``spec.lsj`` a scale of ``U(lsj_min,
    lsj_max)`` times the fit-in-``image_size`` scale and a uniform random crop.
    The canvas is ``spec.canvas_for(src_h, src_w)``.
    Eval (``train=False``, deterministic): no flip, the largest of
    ``spec.scales`` as shorter side (Detectron2's test size is its largest
    train size; with ``lsj``, the fit scale), no crop.

    Draw order (fixed, for determinism): flip, scale, crop y, crop x.
    """
    H, W = spec.canvas_for(src_h, src_w)
    flip = bool(train and spec.flip and rng.random() < 0.5)
    if spec.lsj:
        scale = min(H / src_h, W / src_w)
        if train:
            scale *= float(rng.uniform(spec.lsj_min_scale, spec.lsj_max_scale))
    else:
        short = int(rng.choice(spec.scales)) if train else max(spec.scales)
        scale = min(short / min(src_h, src_w), spec.max_size / max(src_h, src_w))
    new_h = max(int(src_h * scale + 0.5), 1)
    new_w = max(int(src_w * scale + 0.5), 1)
    oy = int(rng.integers(0, new_h - H + 1)) if train and new_h > H else 0
    ox = int(rng.integers(0, new_w - W + 1)) if train and new_w > W else 0
    out_h, out_w = min(new_h - oy, H), min(new_w - ox, W)
    return Geometry(src_h, src_w, flip, new_w / src_w, new_h / src_h, ox, oy, out_h, out_w,
                    float(scale))


def transform_image(image: np.ndarray, geom: Geometry, spec: InputSpec) -> np.ndarray:
    """Flips, resizes (bilinear, antialiased), crops and pads an image.

    Args:
      image: [h, w, 3] uint8 source.
      geom: its geometry.
      spec: for the padded size (``spec.canvas_for`` the source) and dtype.

    Returns:
      [H, W, 3] uint8 or float32; the image at [0:out_h, 0:out_w], zeros elsewhere.
    """
    pil = Image.fromarray(image)
    if geom.flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    src_box = (
        geom.offset_x / geom.sx,
        geom.offset_y / geom.sy,
        (geom.offset_x + geom.out_w) / geom.sx,
        (geom.offset_y + geom.out_h) / geom.sy,
    )
    resized = np.asarray(pil.resize((geom.out_w, geom.out_h), Image.Resampling.BILINEAR,
                                    box=src_box))
    canvas = spec.canvas_for(geom.src_h, geom.src_w)
    out = np.zeros(canvas + (3,), np.dtype(spec.image_dtype))
    out[: geom.out_h, : geom.out_w] = resized
    return out


def transform_boxes(boxes: np.ndarray, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Maps boxes to network-input pixels and clips them to the resized image.

    Args:
      boxes: [N, 4] xyxy source pixels.
      geom: the geometry.

    Returns:
      boxes: [N, 4] float32 xyxy, clipped to ``[0, out_w] x [0, out_h]``.
      keep: [N] bool, False for boxes that the crop left empty (or thinner
        than ``MIN_CUT_BOX_SIDE`` where it cut them).
    """
    b = boxes.astype(np.float64)
    if geom.flip:
        b = np.stack([geom.src_w - b[:, 2], b[:, 1], geom.src_w - b[:, 0], b[:, 3]], axis=1)
    b = b * [geom.sx, geom.sy, geom.sx, geom.sy] - [geom.offset_x, geom.offset_y] * 2
    clipped = np.clip(b, 0, [geom.out_w, geom.out_h] * 2)
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    cut = np.any(np.abs(clipped - b) > 1e-3, axis=1)
    min_side = np.where(cut, MIN_CUT_BOX_SIDE, 0.0)
    keep = (w > min_side) & (h > min_side) & (w > 0) & (h > 0)
    return clipped.astype(np.float32), keep


def crop_source_masks(
    source_masks: np.ndarray, out_boxes: np.ndarray, geom: Geometry, size: int
) -> np.ndarray:
    """Box-cropped masks of output boxes, sampled from the source masks.

    Args:
      source_masks: [N, h, w] {0, 1} masks in source pixels.
      out_boxes: [N, 4] xyxy network-input pixels (from transform_boxes).
      geom: the geometry mapping source to output.
      size: S.

    Returns:
      [N, S, S] uint8 {0, 1}: cell (i, j) is the mask at the centre of cell
      (i, j) of the output box, mapped back to the source (bilinear, >= 0.5).
    """
    xs = (mask_crop.cell_centres(out_boxes[:, 0], out_boxes[:, 2], size) + geom.offset_x) / geom.sx
    if geom.flip:
        xs = geom.src_w - xs
    ys = (mask_crop.cell_centres(out_boxes[:, 1], out_boxes[:, 3], size) + geom.offset_y) / geom.sy
    return (mask_crop.sample_masks(source_masks, xs, ys) >= 0.5).astype(np.uint8)


def preprocess(
    example: dict[str, Any],
    spec: InputSpec,
    train: bool,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Turns a stored example into fixed-size network input (module docstring).

    Instances are ordered non-crowd first (then crowd), each group in stored
    order; instances the crop removed are dropped, and beyond
    ``max_instances`` the rest are dropped with a logged warning and counted
    in ``num_truncated``.

    Args:
      example: a stored example as read from the data source.
      spec: preprocessing options.
      train: random flip/scale/crop (needs ``rng``) or the eval transform.
      rng: the example's random generator (train only).
    """
    if train and rng is None:
        raise ValueError("train preprocessing needs an rng")
    image = images.decode_image(example["image"])  # [h, w, 3]
    src_h, src_w = image.shape[:2]
    obj = objects_as_arrays(example)
    geom = sample_geometry(src_h, src_w, spec, train, rng)
    out_image = transform_image(image, geom, spec)
    boxes, keep = transform_boxes(obj["bbox"], geom)

    order = np.concatenate([np.flatnonzero(keep & ~obj["is_crowd"]),
                            np.flatnonzero(keep & obj["is_crowd"])])
    m = spec.max_instances
    num_truncated = max(len(order) - m, 0)
    if num_truncated:
        logger.warning(
            "image id %d (%s): %d instances, max_instances=%d: %d truncated",
            int(example["image_id"]), _text(example.get("file_name", b"")), len(order), m,
            num_truncated,
        )
    order = order[:m]
    n = len(order)
    source_masks = masks.decode_rles([obj["mask"][i] for i in order], src_h, src_w)

    s = spec.mask_size
    out = empty_example(spec, out_image.shape[:2])
    out["image"] = out_image
    out["boxes"][:n] = boxes[order]
    out["labels"][:n] = obj["label"][order]
    out["masks"][:n] = crop_source_masks(source_masks, boxes[order], geom, s)
    out["is_crowd"][:n] = obj["is_crowd"][order]
    out["valid"][:n] = True
    out["image_id"] = np.int32(example["image_id"])
    out["original_size"] = np.array([src_h, src_w], np.int32)
    out["image_size"] = np.array([geom.out_h, geom.out_w], np.int32)
    out["scale"] = np.float32(geom.scale)
    out["valid_image"] = np.bool_(True)
    out["num_truncated"] = np.int32(num_truncated)
    return out


def empty_example(
    spec: InputSpec, canvas: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """An all-padding example (``valid_image`` False, ``image_id`` -1); see ``batch.py``.

    Args:
      spec: instance slots, mask size and dtype.
      canvas: (H, W) of its image; ``spec.image_size`` if None.
    """
    return batch.empty_example(canvas or spec.image_size, spec.max_instances, spec.mask_size,
                               spec.image_dtype)


def is_portrait(height: int | np.ndarray, width: int | np.ndarray) -> np.bool_ | np.ndarray:
    """Orientation of a source image (elementwise on arrays): ``height > width``.

    A square image counts as landscape, whose canvas is the first of
    ``aspect_canvases``.
    """
    return np.greater(height, width)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
