"""Sampling for people to look at: translation grids, saved as PNG. Owns eval mode.

Every function here switches the nets to eval mode itself and restores each module's own flag
afterwards, so callers never have to remember (seed 000's lesson: sampling in training mode
hides what batch norm does at inference).
"""

import os
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


@contextmanager
def eval_mode(nets, enabled=True):
    """Put every module in eval mode (or train mode with enabled=False) and restore each flag."""
    flags = [(m, m.training) for m in nets.modules()]
    nets.train(not enabled)
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def to_rgb(x):
    """N×C×H×W in [-1, 1] (C = 1 or 3) → N×3×H×W, so that grey and colour domains tile together."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def translation_grid(spec, cfg, nets, x, direction="ab", z=None, train_mode=False):
    """Rows of input | output | reconstruction (the last only for two-way models).

    `train_mode=True` samples in training mode instead (for the seed-000 comparison)."""
    back = {"ab": "ba", "ba": "ab"}.get(direction)
    with eval_mode(nets, enabled=not train_mode):
        out = spec.translate(cfg, nets, x, direction, z)
        columns = [x, out]
        if back in spec.directions:
            columns.append(spec.translate(cfg, nets, out, back, None))
    return tile([to_rgb(c.float().cpu()) for c in columns])


def tile(columns, pad=2):
    """Tile equal-length N×3×H×W batches as columns of an image grid: one row per sample."""
    n, _, h, w = columns[0].shape
    grid = torch.ones(3, n * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = col[i]
    return grid


def save_png(image, path):
    """Save a 3×H×W tensor in [-1, 1] as PNG, atomically (temp name, then rename)."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
