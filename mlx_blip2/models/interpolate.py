"""Bicubic resizing of the ViT's position grid, matching ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`` (Keys' cubic with a = -0.75, edge pixels repeated), so that images at other resolutions
(the -coco checkpoints use 364 px) see the same position embeddings as in transformers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

A = -0.75


def _cubic(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    near = ((A + 2) * t - (A + 3)) * t * t + 1
    far = ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of interpolation weights along one axis."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(int)
    w = np.zeros((out_size, in_size))
    for offset in range(-1, 3):
        idx = base + offset
        np.add.at(w, (np.arange(out_size), np.clip(idx, 0, in_size - 1)), _cubic(src - idx))
    return w


def bicubic_resize(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Resize (N, H, W, C) to (N, size[0], size[1], C)."""
    _, h, w, _ = x.shape
    wh, ww = _weights(h, size[0]), _weights(w, size[1])
    out = np.einsum("oh,nhwc,pw->nopc", wh, np.array(x.astype(mx.float32), dtype=np.float64), ww)
    return mx.array(out.astype(np.float32))
