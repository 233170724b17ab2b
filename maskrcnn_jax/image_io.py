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
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes taken as images when a directory is given to ``list_images``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


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
