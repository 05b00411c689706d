"""Judges: small frozen CNNs that score translations of labelled digits (MNIST, MNIST-M, USPS).

- digit judges read the class of a digit in one domain (`eval/label_acc_<dir>`, CoGAN's
  `eval/pair_agreement`); trained on that domain's labelled training images with small random
  affine warps (and, for colour domains, channel shuffles, inversions and contrast/brightness
  jitter, since MNIST-M's colours are arbitrary);
- the realism judge says whether an image belongs to a colour domain (MNIST-M) rather than to the
  gray domain it was translated from: its negatives are plain gray digits AND the same digits
  tinted (random foreground/background colours, colour jitter, noise), so that a generator that
  only colourises MNIST does not pass.

A judge's file name carries `recipe_key(recipe)`, a hash of every training setting and of
JUDGE_VERSION (bump it when the training code changes what a recipe means), so a changed recipe
trains a new judge instead of loading an old one. Images are N×C×H×W in [-1, 1].
"""

import hashlib
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage

JUDGE_VERSION = 2  # 1: three plain convolutions, no augmentation (0.96 MNIST, 0.65 MNIST-M)

# Measured on one CPU core (test accuracy, seconds): MNIST 32 px 0.984, 21 s (3600 images);
# MNIST 28 px 0.97+ (4000); USPS 0.973, 18 s (4000). MNIST-M gets more epochs because it has half
# the images and colour to see past: 0.898, 53 s (1800); 50 epochs reached 0.928 in about 90 s.
DIGIT_RECIPE = {"epochs": 8, "min_steps": 100, "width": 16, "batch_size": 64, "lr": 3e-3,
                "augment": True, "colour": False}  # fmt: skip
COLOUR_RECIPE = {"epochs": 30, "colour": True}
REALISM_RECIPE = {"steps": 300, "width": 8, "batch_size": 64, "lr": 3e-3}


def recipe_key(recipe):
    """12 hex digits over the sorted recipe and JUDGE_VERSION: equal recipes, equal keys."""
    text = json.dumps({**recipe, "judge_version": JUDGE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ============================================================================= the network


class DigitClassifier(nn.Module):
    """Five 3×3 convolutions with batch norm in three stages, global average pooling and a linear
    layer (a VGG-like stack, small enough to train in seconds on one core). Judges are used frozen,
    in eval mode: `predict` puts them there."""

    def __init__(self, channels=1, size=28, num_classes=10, width=16):
        super().__init__()
        self.channels, self.size = channels, size

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        if x.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(
                f"classifier takes {self.channels}×{self.size}×{self.size} images, got {tuple(x.shape[1:])}"
            )
        return self.head(self.features(x))


# ============================================================================= augmentation


def _uniform(n, generator):
    return torch.rand(n, generator=generator) * 2 - 1


def random_affine(x, generator, shift=0.1, degrees=12.0, scale=0.1, shear=0.1):
    """Small random rotation, scale, shear and shift (a fraction of the half-width), per image.
    The background (each image's per-channel minimum) fills what comes in from outside."""
    n = len(x)
    angle = _uniform(n, generator) * math.radians(degrees)
    zoom = 1 + _uniform(n, generator) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    skew, dx, dy = (_uniform(n, generator) * s for s in (shear, shift, shift))
    theta = torch.stack([torch.stack([cos, skew - sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin((2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False) + background


def colour_jitter(x, generator, contrast=0.4, brightness=0.3):
    """Shuffled channels, half the images inverted, contrast and brightness jitter."""
    n = len(x)
    perm = torch.stack([torch.randperm(x.shape[1], generator=generator) for _ in range(n)])
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    sign = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, -1.0, 1.0)
    x = x * sign
    mean = x.mean((1, 2, 3), keepdim=True)
    gain = 1 + contrast * _uniform(n, generator)[:, None, None, None]
    shift = brightness * _uniform(n, generator)[:, None, None, None]
    return ((x - mean) * gain + mean + shift).clamp(-1, 1)


def tint(gray, generator, noise=0.1):
    """Gray digits (N×1×H×W) made colour without any real texture, the cheap ways a generator
    might: a third each of random foreground/background colours, per-channel gain and offset of
    the gray image, and the plain gray image repeated; then Gaussian noise of random strength."""
    n = len(gray)
    u = (gray + 1) / 2  # ink in [0, 1]
    fg, bg = (torch.rand(n, 3, 1, 1, generator=generator) for _ in range(2))
    two_colours = bg + (fg - bg) * u
    gain = 0.5 + torch.rand(n, 3, 1, 1, generator=generator)
    offset = torch.rand(n, 3, 1, 1, generator=generator) - 0.5
    jittered = (u * gain + offset).clamp(0, 1)
    plain = u.expand(-1, 3, -1, -1)
    mode = torch.randint(3, (n, 1, 1, 1), generator=generator)
    out = torch.where(mode == 0, two_colours, torch.where(mode == 1, jittered, plain))
    sigma = noise * torch.rand(n, 1, 1, 1, generator=generator)
    out = out + sigma * torch.randn(out.shape, generator=generator)
    return (out * 2 - 1).clamp(-1, 1)


# ============================================================================= training


def _fit(net, batches, steps, lr, device):
    """Adam with a one-cycle learning rate over `steps` batches from `batches()`; eval mode after."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    net.train()
    for _ in range(steps):
        x, y = batches()
        loss = F.cross_entropy(net(x.to(device)), y.to(device), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


def _seeded_net(seed, *args, device="cpu"):
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return DigitClassifier(*args).to(device)


def _shuffled(n, batch_size, generator):
    """A function giving the next `batch_size` indices of an endless sequence of permutations."""
    state = {"order": torch.zeros(0, dtype=torch.long)}

    def take():
        if len(state["order"]) < batch_size:
            state["order"] = torch.cat([state["order"], torch.randperm(n, generator=generator)])
        batch, state["order"] = state["order"][:batch_size], state["order"][batch_size:]
        return batch

    return take


CLASSIFIER_DEFAULTS = {"epochs": 6, "batch_size": 64, "min_steps": 100, "width": 16, "lr": 3e-3,
                       "augment": True, "colour": False, "seed": 0}
REALISM_DEFAULTS = {"steps": 300, "batch_size": 64, "width": 8, "lr": 3e-3, "seed": 0}


def settings(recipe: dict | None, defaults: dict) -> dict:
    """A judge recipe (the dict that also names its cache file) over its defaults; unknown keys are
    a typo, not a setting to ignore."""
    unknown = set(recipe or {}) - set(defaults)
    if unknown:
        raise TypeError(f"unknown judge setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **(recipe or {})}


def train_classifier(images, labels, recipe: dict | None = None, device="cpu"):
    """A DigitClassifier for N×C×H×W images and int labels, trained for `epochs` passes (at least
    `min_steps` steps) on randomly warped (`augment`) and recoloured (`colour`) copies; `recipe`
    overrides CLASSIFIER_DEFAULTS."""
    r = settings(recipe, CLASSIFIER_DEFAULTS)
    labels, generator = torch.as_tensor(labels).long(), torch.Generator().manual_seed(r["seed"])
    net = _seeded_net(r["seed"], images.shape[1], images.shape[-1], int(labels.max()) + 1, r["width"],
                      device=device)
    take = _shuffled(len(images), r["batch_size"], generator)

    def batches():
        index = take()
        x = images[index]
        if r["augment"]:
            x = random_affine(x, generator)
        if r["colour"]:
            x = colour_jitter(x, generator)
        return x, labels[index]

    steps = max(r["min_steps"], r["epochs"] * math.ceil(len(images) / r["batch_size"]))
    return _fit(net, batches, steps, r["lr"], device)


def train_realism_judge(real, gray, recipe: dict | None = None, device="cpu"):
    """Class 1 = `real` colour-domain images, class 0 = `gray` digits (N×1×H×W) tinted afresh in
    every batch by `tint`; half of each batch each. Both get the same small affine warps, so
    position and shape tell nothing. `recipe` overrides REALISM_DEFAULTS."""
    r = settings(recipe, REALISM_DEFAULTS)
    generator = torch.Generator().manual_seed(r["seed"])
    net = _seeded_net(r["seed"], real.shape[1], real.shape[-1], 2, r["width"], device=device)
    half = r["batch_size"] // 2
    take_real, take_gray = _shuffled(len(real), half, generator), _shuffled(len(gray), half, generator)

    def batches():
        x = torch.cat([real[take_real()], tint(gray[take_gray()], generator)])
        y = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(half, dtype=torch.long)])
        return random_affine(x, generator), y

    return _fit(net, batches, r["steps"], r["lr"], device)


# ============================================================================= use


def predict(classifier, images, batch_size=256):
    """Class index per image (int64, on the CPU); the judge is put in eval mode."""
    classifier.eval()
    device = next(classifier.parameters()).device
    with torch.no_grad():
        return torch.cat([
            classifier(images[i:i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ])  # fmt: skip


def accuracy(classifier, images, labels):
    return (predict(classifier, images) == torch.as_tensor(labels).cpu()).double().mean().item()


def realism(judge, images):
    """Fraction of `images` the realism judge puts in the colour domain (class 1)."""
    return predict(judge, images).double().mean().item()


def pair_agreement(cls_a, cls_b, x_a, x_b):
    """Fraction of generated pairs whose two images the two domain classifiers put in one class
    (CoGAN: the coupled generators should draw the same digit in both domains)."""
    return (predict(cls_a, x_a) == predict(cls_b, x_b)).double().mean().item()


def class_entropy(classifier, images, num_classes=10):
    """Entropy of the predicted class histogram over log(num_classes): 1 when every class is drawn
    equally often, 0 when one class takes all. Pair agreement alone is passed by a generator that
    draws one blob both judges call '1' (an untrained CoGAN scores 1.0): read the two together."""
    counts = torch.bincount(predict(classifier, images), minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum() / torch.log(torch.tensor(float(num_classes))))


# ============================================================================= files


def save_classifier(classifier, path, recipe=None):
    """safetensors file written to a temp name, then renamed: readers never see half a file. The
    recipe goes into the metadata, to be read by people (the file name carries its hash)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    meta = {"channels": classifier.channels, "size": classifier.size,
            "width": classifier.features[0].out_channels,
            "classes": classifier.head.out_features}  # fmt: skip
    meta = {k: str(v) for k, v in meta.items()}
    if recipe is not None:
        meta["recipe"] = json.dumps({**recipe, "judge_version": JUDGE_VERSION}, sort_keys=True, default=str)
    with storage.replacing(path) as temp:
        save_file(state, temp, metadata=meta)
    return path


def load_classifier(path, device="cpu"):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = {k: int(v) for k, v in f.metadata().items() if k != "recipe"}
    net = DigitClassifier(meta["channels"], meta["size"], meta["classes"], meta["width"])
    net.load_state_dict(load_file(path))
    return net.to(device).eval()
