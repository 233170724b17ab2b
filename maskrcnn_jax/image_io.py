"""Reading image files for inference, with one-line errors that name the file.

Every readable image comes out as ``[H, W, 3] uint8`` RGB:

- grayscale (``L``, ``1``) is repeated to three channels;
- palette (``P``) images are expanded through their palette;
- alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is *dropped*, keeping
  the stored colour under transparent pixels, which is what the training input
  pipeline (``maskrcnn_jax.data.images``) does, so models see the same pixels;
- 16-bit and 32-bit grey (``I;16*``, ``I``, ``F``) is scaled from 0..65535 to
  0..255 (from 0..max when larger values occur), again as in training;
- ``CMYK``, ``YCbCr`` and the rest go through PIL's RGB conversion;
- multi-frame files (GIF, TIFF) give their first frame.

EXIF orientation: ``load_image`` applies it by default (``exif_transpose=True``),
so a phone photo is upright in the picture ``predict`` draws and in the boxes it
writes. COCO annotations are in the *stored* pixel frame (pycocotools-based tools
never transpose), so evaluation reads with ``exif_transpose=False``.

Decoding is forced with ``Image.load()``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
left off, so a truncated file is an error instead of a grey-padded image.

``load_batches`` is the loop ``predict`` and ``evaluate`` share: read items in
batches, report each unreadable one on one line, skip it and go on.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np
import tqdm
from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes taken as images when a directory is given to ``list_images``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

T = TypeVar("T")


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names the file and fits on one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def to_rgb(image: Image.Image) -> np.ndarray:
    """Converts a loaded PIL image of any mode to ``[H, W, 3] uint8`` RGB (see module doc)."""
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        grey = np.asarray(image).astype(np.float64)
        top = 65535.0 if grey.max(initial=0) <= 65535 else float(grey.max())
        grey = np.clip(np.round(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "P":
        # Through RGBA so that palette transparency cannot abort the conversion.
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> np.ndarray:
    """Reads an image file as RGB.

    Args:
      path: the image file.
      exif_transpose: apply the EXIF orientation tag (see module doc; ``False``
        for COCO-style evaluation).

    Returns:
      ``[H, W, 3] uint8``.

    Raises:
      ImageError: naming ``path`` on one line, for a missing or unreadable file,
        a file that is not an image, or a corrupt or truncated one.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as image:
            image.load()  # Decodes everything: truncated and corrupt data fail here.
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            array = to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {_one_line(e)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # PIL reports truncated / corrupt data as OSError ("image file is truncated",
        # "broken data stream"), SyntaxError or ValueError depending on the plugin.
        raise ImageError(f"{name}: corrupt or truncated image ({_one_line(e)})") from None
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise ImageError(f"{name}: cannot convert to RGB (got array of shape {array.shape})")
    return array


def list_images(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expands directories among ``paths`` to the image files in them (sorted, not recursive).

    Files are returned as given, whatever their suffix, so that a bad one is
    reported by ``load_image`` rather than silently skipped.
    """
    out = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            out.extend(
                os.path.join(path, f)
                for f in sorted(os.listdir(path))
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
            )
        else:
            out.append(path)
    return out


def log_to_stderr(message: str) -> None:
    """Writes one line to stderr without breaking a tqdm progress bar."""
    tqdm.tqdm.write(message, file=sys.stderr)


@dataclasses.dataclass
class LoadedBatch(Generic[T]):
    """One batch from :func:`load_batches`.

    Attributes:
      items: the items whose image was read, in input order.
      images: their images, ``[H, W, 3] uint8`` each (``len(items)`` of them).
      skipped: ``(item, one-line reason)`` for each item that could not be read.
    """

    items: list[T]
    images: list[np.ndarray]
    skipped: list[tuple[T, str]]


def load_batches(
    items: Sequence[T],
    load: Callable[[T], np.ndarray],
    batch_size: int,
    log: Callable[[str], None] | None = None,
    log_prefix: str = "skipped",
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[LoadedBatch[T]]:
    """Reads ``items`` in batches, skipping (and reporting) the unreadable ones.

    Each run of ``batch_size`` consecutive items (the last may be shorter)
    gives one :class:`LoadedBatch`, even when none of its images could be
    read (then ``images`` is empty), so callers see every item once.

    Args:
      items: what to read (paths, COCO image records ...).
      load: item -> ``[H, W, 3] uint8`` image; raises :class:`ImageError`
        (one line, naming the file) for an item to skip. Other exceptions
        propagate.
      batch_size: items per batch (>= 1).
      log: receives ``"<log_prefix>: <reason>"``, one line per skipped item
        (default: stderr, see :func:`log_to_stderr`).
      log_prefix: first word of those lines.
      progress: show a tqdm bar over the items (on a terminal), advanced
        after the caller has handled each batch.
      desc: the bar's label.

    Yields:
      ``LoadedBatch`` per run of ``batch_size`` items, in order.

    Raises:
      ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if log is None:
        log = log_to_stderr
    items = list(items)
    with tqdm.tqdm(
        total=len(items), unit="img", desc=desc, disable=None if progress else True
    ) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch: LoadedBatch[T] = LoadedBatch([], [], [])
            for item in chunk:
                try:
                    image = load(item)
                except ImageError as e:
                    batch.skipped.append((item, str(e)))
                    log(f"{log_prefix}: {e}")
                    continue
                batch.items.append(item)
                batch.images.append(image)
            yield batch
            bar.update(len(chunk))
