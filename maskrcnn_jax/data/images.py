"""Image bytes -> RGB uint8 arrays, whatever the file's mode.

Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images all come
out as [H, W, 3] uint8 RGB. EXIF orientation is ignored, as COCO's annotations
are in the stored pixel frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# One conversion for training data and for inference inputs, so that both see
# the same pixels.
from maskrcnn_jax.image_io import to_rgb

__all__ = ["STORED_FORMATS", "decode_image", "to_rgb"]

# Formats whose bytes are stored as they are; others are re-encoded as PNG.
STORED_FORMATS = ("JPEG", "PNG")


def decode_image(data: bytes) -> np.ndarray:
    """Decodes encoded image bytes (any format PIL reads) to [H, W, 3] uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def read_image_for_storage(path: str) -> tuple[bytes, int, int]:
    """Reads and fully decodes an image file, returning the bytes to store.

    JPEG and PNG bytes are kept as they are (the pipeline converts their mode
    when decoding); other formats are converted to RGB and re-encoded as PNG.

    Args:
      path: image file.

    Returns:
      (encoded bytes, height, width).

    Raises:
      OSError: missing or unreadable file (FileNotFoundError when missing).
      PIL.UnidentifiedImageError, ValueError, SyntaxError: corrupt data.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Decodes everything: truncated or corrupt files fail here.
        width, height = image.size
        if image.format in STORED_FORMATS:
            return data, height, width
        return encode_png(to_rgb(image)), height, width


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an [H, W, 3] (or [H, W]) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
