"""FID and KID from a user-supplied TorchScript Inception on disk (nothing is downloaded)."""

import os

import numpy as np
import torch

from pipeline.evaluation.grids import to_rgb

FID_SKIPPED = ("FID/KID skipped: set eval.inception_path to a TorchScript Inception file on disk, "
               "e.g. inception-2015-12-05.pt; nothing is downloaded")  # fmt: skip


def load_feature_extractor(path, device="cpu"):
    """A user-supplied TorchScript Inception (e.g. inception-2015-12-05.pt, as used by StyleGAN3
    and clean-fid). Only ever read from disk: nothing is downloaded."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no TorchScript feature extractor at {path!r} (nothing is downloaded)")
    return torch.jit.load(path, map_location=device).eval()


def extract_features(extractor, images, batch_size=64):
    """N×D float64 features of N×C×H×W images in [-1, 1], given to the extractor as 3-channel
    values in [0, 255] (whole numbers, as decoded PNGs) with return_features=True when it takes it."""
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    keyword, feats = True, []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = ((to_rgb(images[i:i + batch_size].float()).clamp(-1, 1) + 1) * 127.5).round().to(device)
            try:
                out = extractor(x, return_features=True) if keyword else extractor(x)
            except (TypeError, RuntimeError):
                if not keyword or i:  # the plain call failed, or the keyword worked before
                    raise
                keyword, out = False, extractor(x)  # an extractor that returns features plainly
            out = out[0] if isinstance(out, tuple | list) else out
            feats.append(out.flatten(1).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(feats1, feats2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), float64.

    tr (Σ1 Σ2)^½ is computed as the sum of the square roots of the eigenvalues of the symmetric
    Σ1^½ Σ2 Σ1^½ (the same eigenvalues): exact, real, and stable on the rank-deficient
    covariances of a few dozen samples, where scipy's sqrtm can return complex noise."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)


def kernel_inception_distance(feats1, feats2, subsets=100, subset_size=1000, seed=0):
    """Unbiased MMD² with the polynomial kernel (x·y / d + 1)³, averaged over random subsets
    (Bińkowski et al. 2018, as in StyleGAN3's metrics)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    d = f1.shape[1]
    m = min(len(f1), len(f2), subset_size)
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    if m == len(f1) == len(f2):
        subsets = 1  # every subset is the whole of both sets, and MMD ignores the order
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / subsets / m)
