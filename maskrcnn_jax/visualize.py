"""Pictures of predictions for people to look at.

``draw_predictions`` paints each detection kept by the score threshold as a
translucent mask (probability > ``mask_threshold``) with a solid outline, its
box, and a label ``"<class name> <score>"`` on a filled tag above the box.
Colours are per detection (distinct neighbouring hues), so touching objects of
one class stay tellable apart; the text says the class.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def instance_color(index: int) -> tuple[int, int, int]:
    """A saturated RGB colour for the ``index``-th detection; neighbours differ in hue."""
    hue = (0.13 + index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def label_name(label: int, class_names: Sequence[str] | None) -> str:
    """``class_names[label]``, or the number when there is no such name."""
    if class_names is not None and 0 <= label < len(class_names) and class_names[label]:
        return str(class_names[label])
    return str(label)


def _font(image_size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = int(np.clip(min(image_size) / 32, 11, 40))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font.
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` [H, W] bool with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def draw_predictions(
    image: np.ndarray | Image.Image,
    prediction: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """Draws masks, boxes, class names and scores on a copy of ``image``.

    Args:
      image: ``[H, W, 3] uint8`` RGB array or PIL image.
      prediction: ``boxes [N, 4]`` xyxy in ``image``'s pixels, ``scores [N]``,
        ``labels [N]``, optionally ``masks [N, H, W]`` (or ``[N, 1, H, W]``)
        probabilities at ``image``'s size.
      class_names: name of each label (index = label); numbers are shown
        for labels without one.
      score_threshold: detections scoring below it are not drawn.
      mask_threshold: probability above which a mask pixel is painted.
      mask_alpha: opacity of the mask fill.

    Returns:
      A new RGB ``PIL.Image`` of ``image``'s size. Higher-scoring detections are
      drawn last, so they sit on top.
    """
    base = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    )
    width, height = base.size
    canvas = np.asarray(base, np.float32).copy()  # [H, W, 3]

    boxes = np.asarray(prediction["boxes"], np.float32).reshape(-1, 4)
    scores = np.asarray(prediction["scores"], np.float32).reshape(-1)
    labels = np.asarray(prediction["labels"]).astype(np.int64).reshape(-1)
    masks = prediction.get("masks")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape[1:] != (height, width):
            raise ValueError(f"masks {masks.shape} do not match the image ({height}, {width})")

    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_threshold]
    colors = {i: instance_color(rank) for rank, i in enumerate(order[::-1])}

    if masks is not None:
        for i in order:
            mask = masks[i] > mask_threshold  # [H, W]
            if not mask.any():
                continue
            color = np.asarray(colors[i], np.float32)
            canvas[mask] = (1.0 - mask_alpha) * canvas[mask] + mask_alpha * color
            canvas[_outline(mask)] = color

    out = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = _font((width, height))
    line = max(1, round(min(width, height) / 250))
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colors[i], width=line)
        text = f"{label_name(int(labels[i]), class_names)} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, th // 5)
        tx = min(max(x1, 0.0), max(width - tw - 2 * pad, 0))
        ty = y1 - th - 2 * pad
        if ty < 0:  # No room above the box: put the tag inside it.
            ty = max(y1, 0.0)
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colors[i])
        r, g, b = colors[i]
        ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)
    return out
