"""Label palettes: the colours of a label-map domain (facades' 12 classes, weizmann_horse's 2)
learnt from its training images, and label images snapped to class maps with them."""

import numpy as np
import torch

from pipeline.evaluation.grids import to_rgb


def _colour_images(images):
    """N×H×W×3 float32 colours in [0, 255] from float tensors N×C×H×W in [-1, 1] or uint8 N×H×W×3."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = to_rgb(images.detach().cpu().float())
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 N×H×W×3 label images, got shape {array.shape}")
    return array.astype(np.float32)


def _flat_pixels(colours, tolerance=24.0):
    """The pixels inside flat regions (all four neighbours within `tolerance` per channel): JPEG
    ringing and resampling blend colours at class borders, and those blends outnumber the pixels
    of rare classes; clustering interiors only finds the label colours."""
    right = np.abs(np.diff(colours, axis=2)).max(-1) < tolerance  # N×H×(W-1)
    down = np.abs(np.diff(colours, axis=1)).max(-1) < tolerance  # N×(H-1)×W
    flat = right[:, 1:-1, 1:] & right[:, 1:-1, :-1] & down[:, 1:, 1:-1] & down[:, :-1, 1:-1]
    return colours[:, 1:-1, 1:-1][flat]


def _nearest(pixels, palette, chunk=1 << 16):
    """Index of the nearest palette colour of each of P×3 pixels, as int64 numpy. In chunks: all
    P×K×3 differences at once would be gigabytes for a batch of 256² label maps."""
    p, c = torch.as_tensor(pixels, dtype=torch.float32), torch.as_tensor(palette, dtype=torch.float32)
    parts = [(p[i:i + chunk, None] - c[None]).square().sum(-1).argmin(1) for i in range(0, len(p), chunk)]
    return torch.cat(parts).numpy()


def _initial_colours(pixels, k, step=16, separation=48.0):
    """Deterministic k-means start: the mean colours of the most frequent quantised colours,
    skipping those within `separation` of one already taken (JPEG noise splits a label colour
    over neighbouring bins); filled up in frequency order if too few are far enough apart."""
    codes = (pixels // step).astype(np.int64) @ np.array([256 * 256, 256, 1])  # one code per bin
    uniques, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    means = np.stack([np.bincount(inverse, pixels[:, c], len(uniques)) for c in range(3)], 1)
    means /= counts[:, None]
    order = np.lexsort((uniques, -counts))
    chosen = []
    for i in order:
        if all(np.linalg.norm(means[i] - means[j]) > separation for j in chosen):
            chosen.append(i)
        if len(chosen) == k:
            break
    chosen += [i for i in order if i not in chosen][: k - len(chosen)]
    if len(chosen) < k:
        raise ValueError(f"the label images have {len(chosen)} distinct colours, fewer than {k} classes")
    return means[chosen].copy()


def derive_palette(label_images, num_classes, samples=20000, iterations=10, seed=0):
    """K×3 float32 palette in [0, 255] from real label images (uint8 N×H×W×3 or float tensors in
    [-1, 1]): k-means on a seeded subsample of the pixels inside flat regions. The label maps are
    re-encoded JPEGs, so their colours are noisy and the palette has to be learnt, not read off."""
    colours = _colour_images(label_images)
    pixels = _flat_pixels(colours)
    if len(pixels) < 10 * num_classes:  # tiny or noisy images: cluster every pixel
        pixels = colours.reshape(-1, 3)
    if len(pixels) > samples:
        pixels = pixels[np.random.default_rng(seed).choice(len(pixels), samples, replace=False)]
    pixels = pixels.astype(np.float64)
    palette = _initial_colours(pixels, num_classes)
    for _ in range(iterations):
        assign = _nearest(pixels, palette)
        for k in range(num_classes):
            if (assign == k).any():  # an emptied cluster keeps its colour
                palette[k] = pixels[assign == k].mean(0)
    return torch.from_numpy(palette).float()


def snap_to_palette(images, palette):
    """N×H×W int64 class maps: each pixel's nearest palette colour."""
    colours = _colour_images(images)
    assign = _nearest(colours.reshape(-1, 3), palette)
    return torch.from_numpy(assign.reshape(colours.shape[:3]))
