"""Helpers to call the torchvision references on NHWC / batched JAX-layout data."""

from __future__ import annotations

import numpy as np
import torch


def rois_from_batched(boxes: np.ndarray) -> torch.Tensor:
    """[B, R, 4] -> torchvision's [B*R, 5] (batch index, x1, y1, x2, y2)."""
    b, r, _ = boxes.shape
    idx = np.repeat(np.arange(b, dtype=np.float32), r)[:, None]
    return torch.from_numpy(np.concatenate([idx, boxes.reshape(-1, 4)], axis=1).astype(np.float32))


def nhwc_to_torch(x: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    return t.requires_grad_(requires_grad)


def torch_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def random_boxes(rng: np.random.Generator, shape, extent, min_size=0.0, max_size=None):
    """Random xyxy boxes [*shape, 4] whose corners may lie outside [0, extent]."""
    h, w = extent
    max_size = max_size or max(h, w) / 2
    xy = rng.uniform(-0.1, 1.1, size=(*shape, 2)) * [w, h]
    wh = rng.uniform(min_size, max_size, size=(*shape, 2))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
