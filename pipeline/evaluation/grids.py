"""Sampling and grids for people to look at, and the channel conversions the metrics share.

Every function that runs the nets sets their inference mode itself and restores each module's own
flag afterwards, so callers never have to remember (seed 000's lesson: sampling in training mode
hides what batch norm does at inference). The mode (`models.norms.inference_mode`) is "auto" unless
asked: a batch-norm generator translates each image alone, normalised by its own statistics (the
pix2pix and DualGAN test scripts), so no output depends on its batch; every other norm runs in eval
mode. "eval" (running statistics) and "train" (every layer in training mode, batch statistics of
the whole batch) are there for seed 000's comparison; "train" puts the running statistics back,
since a look is not a training step. Images are N×C×H×W float tensors in [-1, 1] (C = 1 or 3).
"""

from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from models.norms import inference, inference_mode, run_generator
from pipeline import storage


@contextmanager
def eval_mode(nets, enabled=True):
    """Put every module in eval mode (or train mode with enabled=False) and restore each flag.

    With enabled=False the buffers are restored too: batch norm in train mode would otherwise move
    its running statistics, and a look at train-mode outputs must not change the model."""
    with inference(nets, "eval" if enabled else "train"):
        yield


def resolve_mode(spec, cfg, mode="auto"):
    """per_image | eval | train for this model's generator; "auto" picks by its norm."""
    return inference_mode(spec.generator_norm(cfg), mode)


def translate_in_mode(spec, cfg, nets, x, direction="ab", z=None, mode="auto"):
    """spec.translate in inference `mode` (see the module docstring); flags and buffers as found."""
    fn = lambda xi, zi: spec.translate(cfg, nets, xi, direction, zi)  # noqa: E731
    return run_generator(fn, nets, x, z, resolve_mode(spec, cfg, mode))


def to_rgb(x):
    """N×C×H×W in [-1, 1] (C = 1 or 3) → N×3×H×W, so that grey and colour domains tile together."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def match_channels(x, channels):
    """N×C×H×W → `channels` channels: grey is replicated, RGB becomes ITU-R 601 luma (as PIL's L)."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * weights[None, :, None, None]).sum(1, keepdim=True)


def translation_grid(spec, cfg, nets, x, direction="ab", z=None, mode="auto"):
    """Rows of input | output | reconstruction (the last only for two-way models), in inference
    `mode` ("train" for the seed-000 comparison)."""
    back = {"ab": "ba", "ba": "ab"}.get(direction)
    out = translate_in_mode(spec, cfg, nets, x, direction, z, mode)
    columns = [x, out]
    if back in spec.directions:
        columns.append(translate_in_mode(spec, cfg, nets, out, back, None, mode))
    return tile([to_rgb(c.float().cpu()) for c in columns])


def tile(columns, pad=2, min_side=0):
    """Tile equal-length N×3×H×W batches as columns of an image grid: one row per sample. With
    `min_side`, tiles smaller than that are first enlarged by a whole factor, nearest-neighbour
    (pixels stay sharp squares, no interpolated colours), so a 32-px grid is viewable in a browser."""
    columns = [enlarge(c, min_side) for c in columns]
    n, _, h, w = columns[0].shape
    grid = torch.ones(3, n * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = col[i]
    return grid


def enlarge(images, min_side):
    """N×C×H×W enlarged by the smallest whole factor that makes min(H, W) >= min_side."""
    factor = -(-min_side // min(images.shape[-2:])) if min_side else 1
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_png(image, path):
    """Save a 3×H×W tensor in [-1, 1] as PNG, atomically (temp name, then rename)."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with storage.replacing(path) as temp:
        Image.fromarray(np.ascontiguousarray(array)).save(temp, format="PNG")
    return path


def train_eval_outputs(spec, cfg, nets, x, direction="ab", z=None):
    """(train-mode output, eval-mode output) of the same inputs: one row of the norm study."""
    modes = ("train", "eval")
    return tuple(translate_in_mode(spec, cfg, nets, x, direction, z, mode).float().cpu() for mode in modes)


def norm_study_figure(rows, inputs):
    """Seed 000's figure: for each norm kind (in `rows` order), one block of rows
    input | train-mode output | eval-mode output. `rows` = {kind: (train_out, eval_out)}."""
    inputs = to_rgb(inputs.float().cpu())
    train = [to_rgb(t.float().cpu()) for t, _ in rows.values()]
    evals = [to_rgb(e.float().cpu()) for _, e in rows.values()]
    return tile([inputs.repeat(len(rows), 1, 1, 1), torch.cat(train), torch.cat(evals)])
