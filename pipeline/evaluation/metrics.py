"""Image metrics: pure functions of N×C×H×W tensors in [-1, 1] that return per-batch means as
Python floats (L1, PSNR, SSIM, BicycleGAN's diversity), and the CycleGAN paper's FCN scores of
class maps (pixel accuracy, class accuracy, class IoU)."""

import torch
import torch.nn.functional as F


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
