"""Evaluation: sampling grids for people to look at, and quality metrics for the loop to log.

Every function that runs the nets sets their inference mode itself and restores each module's own
flag afterwards, so callers never have to remember (seed 000's lesson: sampling in training mode
hides what batch norm does at inference). The mode (`models.norms.inference_mode`) is "auto" unless
asked: a batch-norm generator translates each image alone, normalised by its own statistics (the
pix2pix and DualGAN test scripts), so no output depends on its batch; every other norm runs in eval
mode. "eval" (running statistics) and "train" (every layer in training mode, batch statistics of
the whole batch) are there for seed 000's comparison; "train" puts the running statistics back,
since a look is not a training step.

Images are N×C×H×W float tensors in [-1, 1] (C = 1 or 3). The metric functions are pure and
return per-batch means as Python floats. `Evaluator` owns the data, the one-off work (label
palettes, digit classifiers, baselines) and the choice of metrics for a model and a dataset:

- aligned pairs (facades, weizmann_horse): `eval/{l1,psnr,ssim}_<dir>` against the ground truth,
  and for the direction that outputs the label domain `eval/{pixel_acc,class_acc,class_iou}_<dir>`
  (the photo→labels score of the CycleGAN paper, with a palette derived from the training labels;
  class means over present classes) and `eval/{class_acc_all,class_iou_all}_<dir>` (means over all
  classes, absent ones counting 0, as the reference's evaluation script);
- unpaired labelled digits (mnist2mnistm): `eval/label_acc_<dir>`, the accuracy of a classifier
  trained on real images of the output domain on the translated test images;
- CoGAN: `eval/pair_agreement`, how often the two domain classifiers agree on a generated pair;
- both directions: `eval/cycle_l1_a`, `eval/cycle_l1_b`; BicycleGAN: `eval/diversity`;
- with a TorchScript Inception on disk: `eval/fid_<dir>`, `eval/kid_<dir>`.
`baseline/...` (a trivial predictor) and `ceiling/...` (the metric's own limit) put them in scale.
"""

import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.norms import inference, inference_mode, run_generator
from pipeline.data import LocalReader, ReadSpec, read_manifest
from pipeline.judges import (  # noqa: F401  (DigitClassifier, predict: part of this module's API)
    COLOUR_RECIPE,
    DIGIT_RECIPE,
    REALISM_RECIPE,
    DigitClassifier,
    accuracy,
    class_entropy,
    load_classifier,
    pair_agreement,
    predict,
    realism,
    recipe_key,
    save_classifier,
    tint,
    train_classifier,
    train_realism_judge,
)

# ============================================================================= sampling and grids


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


def translate_in_mode(spec, cfg, nets, x, direction="ab", z=None, mode="auto", dropout=False):
    """spec.translate in inference `mode` (see the module docstring); flags and buffers as found.
    `dropout=True` keeps dropout on, as pix2pix's test script does."""
    fn = lambda xi, zi: spec.translate(cfg, nets, xi, direction, zi)  # noqa: E731
    return run_generator(fn, nets, x, z, resolve_mode(spec, cfg, mode), dropout)


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


def translation_grid(spec, cfg, nets, x, direction="ab", z=None, mode="auto", dropout=False):
    """Rows of input | output | reconstruction (the last only for two-way models), in inference
    `mode` ("train" for the seed-000 comparison)."""
    back = {"ab": "ba", "ba": "ab"}.get(direction)
    out = translate_in_mode(spec, cfg, nets, x, direction, z, mode, dropout)
    columns = [x, out]
    if back in spec.directions:
        columns.append(translate_in_mode(spec, cfg, nets, out, back, None, mode, dropout))
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


# ============================================================================= image metrics


def _unit(x):
    """[-1, 1] → [0, 1], float64: PSNR and SSIM are defined for data range 1."""
    return (x.double() + 1) / 2


def l1(x, y):
    """Mean absolute difference on the images' own [-1, 1] scale (the pix2pix L1)."""
    return (x.float() - y.float()).abs().mean().item()


def psnr(x, y):
    """Peak signal-to-noise ratio in dB on the [0, 1] scale, per image, then the mean (an exact
    copy scores 100 dB rather than infinity, so that a mean stays finite)."""
    mse = ((_unit(x) - _unit(y)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def gaussian_window(size=11, sigma=1.5):
    """The normalised 1-D Gaussian; SSIM's 2-D window is its outer product with itself."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x, y, window=11, sigma=1.5):
    """SSIM of Wang et al. 2004: Gaussian 11×11 window (σ = 1.5), K1 = 0.01, K2 = 0.03, data range
    1, over the valid positions of each channel, then the mean over positions, channels, images.

    The window is applied as two 1-D passes over the five maps at once, in float32 on centred
    values (within 4e-6 of a float64 2-D window on real facades): the float64 2-D window took
    40 s for 64 images of 256² on a busy CPU core, this takes 3 s."""
    x, y = _unit(x), _unit(y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}×{window}, got {tuple(x.shape[-2:])}")
    # (co)variances do not change when each image channel is shifted by its mean; centred values
    # keep float32's E[x²] − E[x]² cancellation small (it hurts most in flat regions)
    shift_x, shift_y = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    x, y = (x - shift_x).float(), (y - shift_y).float()
    g = gaussian_window(window, sigma).float().to(x.device)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)
    k = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)
    mx, my, xx, yy, xy = maps.double().chunk(5, 1)
    vx, vy, cov = xx - mx**2, yy - my**2, xy - mx * my
    mx, my = mx + shift_x, my + shift_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def diversity(outputs):
    """Mean L1 between every pair of outputs for different z on the same inputs (BicycleGAN)."""
    pairs = [(i, j) for i in range(len(outputs)) for j in range(i + 1, len(outputs))]
    if not pairs:
        raise ValueError("diversity needs at least two outputs")
    return sum(l1(outputs[i], outputs[j]) for i, j in pairs) / len(pairs)


# ============================================================================= label maps


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


def segmentation_scores(pred, true, num_classes):
    """The FCN scores of the CycleGAN paper from ONE confusion matrix over all the pixels given
    (pass the whole set, as the reference accumulates its histogram over every image):
    pixel_acc; class_acc, class_iou: means over the present classes (in the truth; in the truth
    or the prediction); class_acc_all, class_iou_all: means over all num_classes classes, an
    absent class counting 0, as the reference's get_scores (diag / (row sum + 1e-12), diag /
    (row + column sum − diag + 1e-12))."""
    pred, true = torch.as_tensor(pred).flatten().long(), torch.as_tensor(true).flatten().long()
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()  # rows: truth
    hits, in_truth, in_pred = confusion.diag(), confusion.sum(1), confusion.sum(0)
    union = in_truth + in_pred - hits
    return {
        "pixel_acc": (hits.sum() / confusion.sum()).item(),
        "class_acc": (hits[in_truth > 0] / in_truth[in_truth > 0]).mean().item(),
        "class_iou": (hits[union > 0] / union[union > 0]).mean().item(),
        "class_acc_all": (hits / (in_truth + 1e-12)).mean().item(),
        "class_iou_all": (hits / (union + 1e-12)).mean().item(),
    }


# ============================================================================= FID and KID


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


# ============================================================================= the Evaluator

FID_SKIPPED = ("FID/KID skipped: set eval.inception_path to a TorchScript Inception file on disk, "
               "e.g. inception-2015-12-05.pt; nothing is downloaded")  # fmt: skip


SWAP = {"a": "b", "b": "a", "label_a": "label_b", "label_b": "label_a"}


class Evaluator:
    """Metrics of one run, built once by the loop and called at each evaluation.

    Construction does the one-off work: read the first `max_images` of `split` (unaugmented, in the
    reader's seeded order, so a class-ordered set still gives a mixed sample), scan the training
    split for mean images and the label palette (aligned data), and train or load the judges
    (labelled data, see pipeline.judges; up to `train_images` per domain, trained with the
    `classifier` settings over DIGIT_RECIPE (+ COLOUR_RECIPE for colour domains) and the `realism`
    settings over REALISM_RECIPE, cached in `cache_dir` as safetensors when given, under a name
    with the data's content hash and the recipe's hash). `metrics(nets)` then only translates and
    scores. `notes` says what was skipped and why, and each judge's accuracy on the real images.

    `mode` is the inference mode of `metrics` and `grids` unless they are given another: "auto"
    resolves to `self.mode`, per_image for a batch-norm generator and eval otherwise (see the
    module docstring); `dropout=True` keeps dropout on (pix2pix's test script).
    """

    def __init__(self, spec, model_cfg, data_path, split="val", *, train_split="train", size=None,
                 max_images=64, label_domain="b", num_classes=0, cache_dir=None, s3_endpoint=None,
                 inception_path="", device="cpu", seed=0, diversity_samples=4, train_images=4000,
                 classifier=None, realism=None, pairs=256, swap_ab=False, mode="auto",
                 dropout=False):  # fmt: skip
        self.mode, self.dropout = resolve_mode(spec, model_cfg, mode), dropout
        self.swap_ab = swap_ab  # as the run's data.swap_ab: a and b (and their labels) trade places
        self.spec, self.cfg, self.device, self.seed = spec, model_cfg, torch.device(device), seed
        self.data_path, self.train_split, self.s3_endpoint = data_path, train_split, s3_endpoint
        self.size = size or getattr(model_cfg, "image_size", None)  # CoGAN generates at a fixed size
        self.train_images, self.cache_dir = train_images, cache_dir
        self.classifier_settings = {**(classifier or {}), "seed": seed}  # over the domain's recipe
        self.realism_settings = {**REALISM_RECIPE, **(realism or {}), "seed": seed}
        self.diversity_samples, self.pairs = diversity_samples, pairs
        self.manifest = read_manifest(data_path, s3_endpoint)
        self.channels = {"a": model_cfg.channels_a, "b": model_cfg.channels_b}
        self.directions = [d for d in spec.directions if d in ("ab", "ba")]
        self.aligned = self.manifest["layout"] == "aligned"
        self.notes: list[str] = []
        self.data = self._read(split, max_images)
        self.mean_images, self.palette, self.class_counts = {}, None, None
        self.classifiers, self.classifier_files = {}, {}
        self.realism_judges, self.judge_accuracy = {}, {}
        self.label_direction = self._label_direction(label_domain, num_classes)
        self.num_classes = num_classes
        if self.aligned:
            self._scan_train()
        elif spec.name == "cogan" or self.directions:
            self._prepare_classifiers()
        self.extractor, self._real_feats = self._load_extractor(inception_path), {}
        self._baselines = None

    # ------------------------------------------------------------------ data

    def _batches(self, split, limit):
        """Batches of `split` with the model's channels per domain, each domain cut at `limit`."""
        reader = LocalReader(ReadSpec(self.data_path, split, batch_size=min(limit, 256), load_size=self.size,
                                      flip=False, seed=self.seed, s3_endpoint=self.s3_endpoint))
        counts = {k: min(limit, n) for d, n in reader.counts.items() for k in ("ab" if d == "ab" else d)}
        if self.swap_ab:
            counts = {SWAP[k]: n for k, n in counts.items()}
        taken = 0
        for batch in reader:
            if self.swap_ab:  # the run translates the stored b side to the stored a side
                batch = {SWAP.get(k, k): v for k, v in batch.items()}
            out = {}
            for key, value in batch.items():
                value = value[: max(0, counts[key[-1]] - taken)]
                if len(value):  # a smaller domain stops early rather than repeat its images
                    is_label = key.startswith("label_")
                    out[key] = value if is_label else match_channels(value, self.channels[key])
            taken += len(next(iter(batch.values())))
            yield out
            if taken >= max(counts.values()):
                return

    def _read(self, split, limit):
        parts = {}
        for batch in self._batches(split, limit):
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in parts.items()}

    def _label_direction(self, label_domain, num_classes):
        if not (self.aligned and label_domain and num_classes > 0):
            if self.aligned and label_domain and not num_classes:
                self.notes.append(
                    "segmentation scores skipped: set num_classes (facades 12, weizmann_horse 2)"
                )
            return None
        if label_domain not in ("a", "b"):
            raise ValueError(f"label_domain must be 'a', 'b' or '' (none), got {label_domain!r}")
        direction = {"a": "ba", "b": "ab"}[label_domain]
        if direction not in self.directions:
            self.notes.append(f"segmentation scores skipped: {self.spec.name} does not translate {direction}")
            return None
        return direction

    def _scan_train(self):
        """Mean training image per domain, and the label palette from a pixel subsample."""
        sums, counts, samples = {}, {}, []
        label = self.label_direction[1] if self.label_direction else None
        for batch in self._batches(self.train_split, self.train_images):
            for d in ("a", "b"):
                if d in batch:
                    sums[d] = sums.get(d, 0) + batch[d].double().sum(0, keepdim=True)
                    counts[d] = counts.get(d, 0) + len(batch[d])
            if label:
                stride = max(1, batch[label].shape[-1] // 64)  # ≤ 64×64 pixels per image suffice
                samples.append(batch[label][:, :, ::stride, ::stride])
        self.mean_images = {d: (sums[d] / counts[d]).float() for d in sums}
        if label:
            samples = torch.cat(samples)
            self.palette = derive_palette(samples, self.num_classes, seed=self.seed)
            maps = snap_to_palette(samples, self.palette)
            self.class_counts = torch.bincount(maps.flatten(), minlength=self.num_classes)

    def _prepare_classifiers(self):
        labelled = [d for d in ("a", "b") if self.manifest["domains"].get(d, {}).get("labelled")]
        wanted = ["a", "b"] if self.spec.name == "cogan" else [d[1] for d in self.directions]
        missing = sorted({"a", "b"} - set(labelled))  # inputs' labels are the truth, outputs' train
        if missing:
            self.notes.append(f"label metrics skipped: domain(s) {missing} have no labels")
            return
        sizes = {self.data[d].shape[-1] for d in ("a", "b") if d in self.data}
        if len(sizes) > 1:
            raise ValueError(f"domains a and b are read at sizes {sorted(sizes)}: pass size= (e.g. "
                             f"{max(sizes)}) so that translations and classifiers see one size")  # fmt: skip
        size, train = sizes.pop(), {}
        for d in wanted:
            self.classifiers[d] = self._classifier(d, size, train)
        for d, net in self.classifiers.items():  # each figure's ceiling: the judge on real images
            self.judge_accuracy[d] = accuracy(net, self.data[d], self.data[f"label_{d}"])
            self.notes.append(f"classifier {d}: accuracy {self.judge_accuracy[d]:.4f} on "
                              f"{len(self.data[d])} real images of this split")  # fmt: skip
        for d in self.directions:
            if self.channels[d[0]] == 1 and self.channels[d[1]] == 3:  # gray → colour (MNIST → MNIST-M)
                self.realism_judges[d] = self._realism_judge(d, size, train)

    def _cache_path(self, name, size, recipe):
        """The judge's file in cache_dir: the data's content hash, what it reads, and the recipe's hash."""
        if not self.cache_dir:
            return None
        key = (f"{name}-{self.manifest['content_hash'][:16]}-s{size}-n{self.train_images}"
               f"-{recipe_key(recipe)}")  # fmt: skip
        return os.path.join(self.cache_dir, key + ".safetensors")

    def _cached_or_trained(self, label, path, fit, recipe):
        if path and os.path.isfile(path):
            self.notes.append(f"{label}: loaded {path}")
            return load_classifier(path, self.device), path
        net = fit()
        self.notes.append(f"{label}: trained, {f'saved {path}' if path else 'not kept (no cache_dir)'}")
        return net, (save_classifier(net, path, recipe) if path else None)

    def classifier_recipe(self, domain):
        colour = COLOUR_RECIPE if self.channels[domain] == 3 else {}
        return {**DIGIT_RECIPE, **colour, **self.classifier_settings}

    def _classifier(self, domain, size, train):
        """Trained on the labelled training images of `domain`; loaded instead when cached. `train`
        holds the training split once read, for the next judge."""
        recipe = self.classifier_recipe(domain)
        path = self._cache_path(f"digits-{domain}-c{self.channels[domain]}", size, recipe)

        def fit():
            self._read_train(train)
            return train_classifier(train[domain], train[f"label_{domain}"], **recipe, device=self.device)

        net, path = self._cached_or_trained(f"classifier {domain}", path, fit, recipe)
        if path:
            self.classifier_files[domain] = path
        return net

    def _realism_judge(self, direction, size, train):
        """Real images of the output domain against tinted input-domain images (pipeline.judges)."""
        source, target = direction
        recipe = self.realism_settings
        path = self._cache_path(f"realism-{direction}", size, recipe)

        def fit():
            self._read_train(train)
            return train_realism_judge(train[target], train[source], **recipe, device=self.device)

        return self._cached_or_trained(f"realism judge {direction}", path, fit, recipe)[0]

    def _read_train(self, train):
        if not train:
            train.update(self._read(self.train_split, self.train_images))

    def _tinted(self, domain):
        """The eval images of a gray `domain` tinted with a fixed seed: the realism floor."""
        return tint(self.data[domain], torch.Generator().manual_seed(self.seed + 2000))

    def _load_extractor(self, path):
        if not path:
            self.notes.append(FID_SKIPPED)
            return None
        if not os.path.isfile(path):
            self.notes.append(
                f"FID/KID skipped: eval.inception_path {path} does not exist; nothing is downloaded"
            )
            return None
        return load_feature_extractor(path, self.device)

    # ------------------------------------------------------------------ translation

    def _translate(self, nets, x, direction, mode, z=None, batch_size=64):
        """Outputs on the CPU in inference `mode`; BicycleGAN gets z = 0 (its mean output) unless z
        is given."""
        if z is None and self.spec.name == "bicyclegan":
            z = torch.zeros(len(x), self.cfg.nz)
        run = lambda xi, zi: self.spec.translate(self.cfg, nets, xi, direction, zi)  # noqa: E731
        outs = []
        for i in range(0, len(x), batch_size):
            xi = x[i:i + batch_size].to(self.device)
            zi = None if z is None else z[i:i + batch_size].to(self.device)
            outs.append(run_generator(run, nets, xi, zi, mode, self.dropout))
        return torch.cat(outs).float().cpu()

    def _random_z(self, n, offset=0):
        """The same codes at every evaluation, so that curves compare like with like."""
        g = torch.Generator().manual_seed(self.seed + 1000 + offset)
        return torch.randn(n, self.cfg.nz, generator=g)

    def _generate_pairs(self, nets, n, mode):
        z, pairs = self._random_z(n), []
        run = lambda _, zi: self.spec.translate(self.cfg, nets, None, "pair", zi)  # noqa: E731
        for i in range(0, n, 128):
            x_a, x_b = run_generator(run, nets, None, z[i:i + 128].to(self.device), mode, self.dropout)
            pairs.append((x_a.float().cpu(), x_b.float().cpu()))
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    # ------------------------------------------------------------------ metrics

    def metrics(self, nets, mode=None):
        """{"eval/...": float} for the current nets in inference `mode` (default `self.mode`, the
        mode a user is served); modes and buffers are left as found."""
        mode = self.mode if mode in (None, "auto") else mode
        if self.spec.name == "cogan":
            return self._cogan_metrics(nets, mode)
        out = {}
        outputs = {d: self._translate(nets, self.data[d[0]], d, mode) for d in self.directions}
        if self.aligned:
            for d, fake in outputs.items():
                out.update(self._paired_scores(d, fake, self.data[d[1]], "eval"))
            if self.spec.name == "bicyclegan" and self.diversity_samples > 1:
                out["eval/diversity"] = diversity(self._z_samples(nets, self.data["a"], mode))
        for d, fake in outputs.items():
            if d[1] in self.classifiers:  # is the digit still the same digit?
                labels = self.data[f"label_{d[0]}"]
                out[f"eval/label_acc_{d}"] = accuracy(self.classifiers[d[1]], fake, labels)
            if d in self.realism_judges:  # does it look like the output domain, not a tinted input?
                out[f"eval/realism_{d}"] = realism(self.realism_judges[d], fake)
        if set(outputs) == {"ab", "ba"}:
            out["eval/cycle_l1_a"] = l1(self._translate(nets, outputs["ab"], "ba", mode), self.data["a"])
            out["eval/cycle_l1_b"] = l1(self._translate(nets, outputs["ba"], "ab", mode), self.data["b"])
        for d, fake in outputs.items():
            out.update(self._fid(d, d[1], fake))
        return out

    def _z_samples(self, nets, x, mode):
        return [self._translate(nets, x, "ab", mode, self._random_z(len(x), offset=k))
                for k in range(self.diversity_samples)]  # fmt: skip

    def _paired_scores(self, direction, fake, real, prefix):
        out = {
            f"{prefix}/l1_{direction}": l1(fake, real),
            f"{prefix}/psnr_{direction}": psnr(fake, real),
            f"{prefix}/ssim_{direction}": ssim(fake, real),
        }
        if direction == self.label_direction:
            true = snap_to_palette(real, self.palette)
            scores = segmentation_scores(snap_to_palette(fake, self.palette), true, self.num_classes)
            out.update({f"{prefix}/{k}_{direction}": v for k, v in scores.items()})
        return out

    def _cogan_metrics(self, nets, mode):
        out = {}
        x_a, x_b = self._generate_pairs(nets, self.pairs, mode)
        if {"a", "b"} <= set(self.classifiers):
            cls_a, cls_b = self.classifiers["a"], self.classifiers["b"]
            out["eval/pair_agreement"] = pair_agreement(cls_a, cls_b, x_a, x_b)
            out["eval/pair_class_entropy"] = class_entropy(cls_a, x_a)  # 1: all ten digits drawn evenly
            for d in "ab":  # beside it, how well each judge reads real digits: agreement is read against them
                out[f"eval/judge_acc_{d}"] = self.judge_accuracy[d]
        out.update(self._fid("a", "a", x_a))
        out.update(self._fid("b", "b", x_b))
        return out

    def _fid(self, name, domain, fake):
        if self.extractor is None:
            return {}
        if domain not in self._real_feats:
            self._real_feats[domain] = extract_features(self.extractor, self.data[domain])
        real, feats = self._real_feats[domain], extract_features(self.extractor, fake)
        return {
            f"eval/fid_{name}": frechet_distance(feats, real),
            f"eval/kid_{name}": kernel_inception_distance(feats, real),
        }

    # ------------------------------------------------------------------ baselines

    def baselines(self):
        """{"baseline/...", "ceiling/...": float}: what a trivial predictor scores, and the metric's
        own limit. They do not depend on the nets, so they are computed once."""
        if self._baselines is None:
            self._baselines = self._compute_baselines()
        return dict(self._baselines)

    def _compute_baselines(self):
        out = {}
        if self.aligned:
            for d in self.directions:
                real = self.data[d[1]]
                out.update(self._paired_scores(d, self.mean_images[d[1]].expand_as(real), real, "baseline"))
                if d == self.label_direction:  # the most frequent training class everywhere
                    true = snap_to_palette(real, self.palette)
                    pred = torch.full_like(true, int(self.class_counts.argmax()))
                    scores = segmentation_scores(pred, true, self.num_classes)
                    out.update({f"baseline/{k}_{d}": v for k, v in scores.items()})
        elif self.spec.name == "cogan":
            for d in self.classifiers:
                out[f"ceiling/classifier_acc_{d}"] = self.judge_accuracy[d]
        else:
            for d in self.directions:
                net = self.classifiers.get(d[1])
                if net is None:
                    continue
                source = match_channels(self.data[d[0]], self.channels[d[1]])
                out[f"baseline/label_acc_{d}"] = accuracy(net, source, self.data[f"label_{d[0]}"])
                out[f"ceiling/label_acc_{d}"] = self.judge_accuracy[d[1]]
                if d in self.realism_judges:
                    out[f"baseline/realism_{d}"] = realism(self.realism_judges[d], self._tinted(d[0]))
                    out[f"ceiling/realism_{d}"] = realism(self.realism_judges[d], self.data[d[1]])
        return out

    # ------------------------------------------------------------------ grids

    def grids(self, nets, n=4, mode=None):
        """{direction: 3×H×W grid} on the same first n eval images every time, in inference `mode`
        (default `self.mode`). BicycleGAN adds "ab_z" (input | z = 0 | random z ...); CoGAN gives
        "pair" (x_a | x_b for fixed z)."""
        mode = self.mode if mode in (None, "auto") else mode
        if self.spec.name == "cogan":
            x_a, x_b = self._generate_pairs(nets, n, mode)
            return {"pair": tile([to_rgb(x_a), to_rgb(x_b)])}
        grids, bicycle = {}, self.spec.name == "bicyclegan"
        for d in self.directions:
            x = self.data[d[0]][:n].to(self.device)
            z = torch.zeros(len(x), self.cfg.nz, device=self.device) if bicycle else None
            grids[d] = translation_grid(self.spec, self.cfg, nets, x, d, z, mode, self.dropout)
        if bicycle and self.diversity_samples:
            x = self.data["a"][:n]
            columns = [x, self._translate(nets, x, "ab", mode), *self._z_samples(nets, x, mode)]
            grids["ab_z"] = tile([to_rgb(c) for c in columns])
        return grids
