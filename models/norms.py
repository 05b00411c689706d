"""Normalisation layers chosen by name, and Batch Renormalization.

Seed 000 (DualGAN) is about Batch Norm giving different outputs in training and inference mode:
training normalises with the batch's statistics, inference with running averages that the
network never saw while it learned. Batch Renorm (Ioffe 2017) trains with the batch statistics
corrected towards the running ones (r, d), so both modes agree; Instance Norm has no running
statistics at all. `norm_layer(kind, c)` builds any of them so a config can choose.

At test time (`inference_mode`, `inference`, `run_generator`) a batch-norm generator normalises
each image by its own statistics, as the pix2pix and DualGAN test scripts do (batch norm in
training mode at batch size 1); "eval" (running statistics) stays available for seed 000's
comparison, and the other norms run in plain eval mode.
"""

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

NORM_KINDS = ("batch", "batch_renorm", "instance", "none")


class BatchRenorm2d(nn.Module):
    """Batch Renormalization over N, H, W for N×C×H×W input.

    Training: x̂ = (x − μ_B)/σ_B · r + d with r = clip(σ_B/σ, 1/rmax, rmax) and
    d = clip((μ_B − μ)/σ, −dmax, dmax), both treated as constants (no gradient), then the running
    mean and variance move towards the batch's by `momentum`. Eval: x̂ = (x − μ)/σ.
    σ = sqrt(running_var + eps). With rmax=1, dmax=0 training output equals BatchNorm2d's.

    `rmax` and `dmax` are buffers so that the training loop can anneal them (`renorm_limits`: the
    paper's warm-up from batch norm to rmax 3, dmax 5) and so that checkpoints carry them.
    Statistics are computed in fp32 even under autocast, since bf16 variances of large activations
    lose most of their digits.
    Running stats are stored as mean and (unbiased) variance, as BatchNorm2d does, so state dicts
    convert between the two.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.01, rmax=3.0, dmax=5.0, affine=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("rmax", torch.tensor(float(rmax)))
        self.register_buffer("dmax", torch.tensor(float(dmax)))

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"rmax={float(self.rmax):g}, dmax={float(self.dmax):g}, affine={self.affine}"
        )

    def set_limits(self, rmax=None, dmax=None):
        if rmax is not None:
            if rmax < 1.0:
                raise ValueError(f"BatchRenorm2d rmax must be >= 1 (1 means plain batch norm), got {rmax}")
            self.rmax.fill_(float(rmax))
        if dmax is not None:
            if dmax < 0.0:
                raise ValueError(f"BatchRenorm2d dmax must be >= 0, got {dmax}")
            self.dmax.fill_(float(dmax))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"BatchRenorm2d expects N×C×H×W input, got shape {tuple(x.shape)}")
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.to(stat_dtype)
            if self.training:
                y = self._train_normalise(x32)
            else:
                y = self._eval_normalise(x32)
            if self.affine:
                y = (
                    y * self.weight.to(stat_dtype)[None, :, None, None]
                    + self.bias.to(stat_dtype)[None, :, None, None]
                )
        return y.to(x.dtype)

    def _train_normalise(self, x):
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError("BatchRenorm2d needs more than one value per channel in training mode")
        mean_b = x.mean(dim=(0, 2, 3))
        var_b = x.var(dim=(0, 2, 3), unbiased=False)
        std_b = torch.sqrt(var_b + self.eps)
        running_std = torch.sqrt(self.running_var.to(x.dtype) + self.eps)
        rmax, dmax = self.rmax.to(x.dtype), self.dmax.to(x.dtype)
        with torch.no_grad():
            r = torch.clamp(std_b / running_std, 1.0 / rmax, rmax)
            d = torch.clamp((mean_b - self.running_mean.to(x.dtype)) / running_std, -dmax, dmax)
            self._update_running(mean_b, var_b * n / (n - 1))
        x_hat = (x - mean_b[None, :, None, None]) / std_b[None, :, None, None]
        return x_hat * r[None, :, None, None] + d[None, :, None, None]

    def _update_running(self, mean_b, var_unbiased):
        self.running_mean.lerp_(mean_b.to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var_unbiased.to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(1)

    def _eval_normalise(self, x):
        mean = self.running_mean.to(x.dtype)[None, :, None, None]
        std = torch.sqrt(self.running_var.to(x.dtype) + self.eps)[None, :, None, None]
        return (x - mean) / std


def norm_layer(kind, num_features):
    """A 2-d norm layer by name: batch | batch_renorm | instance | none."""
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "batch_renorm":
        return BatchRenorm2d(num_features)
    if kind == "instance":
        # As in CycleGAN: no affine, no running statistics; identical in both modes.
        return nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def conv_bias(kind):
    """Convs before a norm with its own shift need no bias (pix2pix's rule)."""
    return kind not in ("batch", "batch_renorm")


def set_renorm_limits(module, rmax=None, dmax=None):
    """Set rmax/dmax on every BatchRenorm2d inside `module` (the loop's warm-up uses this)."""
    count = 0
    for m in module.modules():
        if isinstance(m, BatchRenorm2d):
            m.set_limits(rmax, dmax)
            count += 1
    return count


# Ioffe 2017's warm-up, in training steps: rmax = 1 and dmax = 0 (plain batch norm) for the first
# 5k steps, then both relaxed gradually (linearly here) to reach rmax = 3 at 40k and dmax = 5 at 25k.
PAPER_WARMUP = {"bn_until": 5_000, "dmax_until": 25_000, "rmax_until": 40_000}


def ramp(step, start, end):
    """0 up to `start`, then linear to 1 at `end`, 1 from there on."""
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


def renorm_limits(step, bn_until, rmax_until, dmax_until, rmax_final=3.0, dmax_final=5.0):
    """(rmax, dmax) for `step` (updates done) under the paper's warm-up shape: batch norm (1, 0)
    until `bn_until`, then rmax rises linearly to rmax_final at `rmax_until` and dmax to dmax_final
    at `dmax_until`. Points in steps (floats allowed); all 0 gives the final limits from the start."""
    return (1.0 + ramp(step, bn_until, rmax_until) * (rmax_final - 1.0),
            ramp(step, bn_until, dmax_until) * dmax_final)


# ============================================================================= inference modes

INFERENCE_MODES = ("per_image", "eval", "train")
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def inference_mode(norm_kind, requested="auto"):
    """The mode a generator with `norm_kind` runs in at test time: per_image | eval | train.

    "auto" follows the papers' test scripts: pix2pix ("we apply batch normalization using the
    statistics of the test batch", batch size 1) and DualGAN's reference normalise each test image
    by its own statistics, so batch norm gets "per_image"; every other norm (batch_renorm, instance,
    none) and a generator without an image norm (norm_kind None, e.g. CoGAN's, which starts from z)
    get "eval". An explicit mode is returned as asked."""
    if requested == "auto":
        return "per_image" if norm_kind == "batch" else "eval"
    if requested not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be auto or one of {', '.join(INFERENCE_MODES)}, "
                         f"got {requested!r}")
    return requested


@contextmanager
def per_image_batch_norm(module):
    """Every nn.BatchNorm2d in `module` normalises with its input's own statistics (training-mode
    normalisation) while its running statistics stay as they are; other layers are not touched.

    BatchNorm2d.forward passes the running buffers to F.batch_norm in training mode only when
    `track_running_stats` is set, and counts `num_batches_tracked` only then (torch 2.13), so with
    training=True and track_running_stats=False no buffer is read or written. Flags are restored."""
    layers = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m, m.training, m.track_running_stats) for m in layers]
    for m in layers:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, training, tracked in saved:
            m.training, m.track_running_stats = training, tracked


@contextmanager
def inference(module, mode="eval", dropout=False):
    """Run `module` in inference `mode` without gradients; every flag and buffer is put back.

    eval: running statistics, dropout off. per_image: eval, except that batch norm normalises with
    the statistics of what it is given (pair it with `per_image` so that this is one image).
    train: every layer in training mode, dropout included (seed 000's comparison); the buffers
    that batch norm and batch renorm then move are restored afterwards, since a look is not a
    training step. `dropout=True` turns dropout on in eval and per_image too (pix2pix's test
    script keeps it on as its noise source)."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    flags = [(m, m.training) for m in module.modules()]
    saved = [(b, b.detach().clone()) for b in module.buffers()] if mode == "train" else []
    module.train(mode == "train")
    if dropout:
        for m in module.modules():
            if isinstance(m, DROPOUTS):
                m.train()
    try:
        with torch.no_grad(), per_image_batch_norm(module) if mode == "per_image" else nullcontext():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def per_image(fn, x, z=None):
    """fn(x_i, z_i) for each image i alone (a batch of 1), concatenated: no output depends on what
    else is in the batch. x or z may be None (a generator from z takes x=None); a tuple output
    (CoGAN's pair) is concatenated element by element."""
    n = len(x) if x is not None else len(z)
    outs = [fn(None if x is None else x[i:i + 1], None if z is None else z[i:i + 1]) for i in range(n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


def run_generator(fn, module, x, z=None, mode="eval", dropout=False):
    """fn(x, z) (a model's translate over `module`) in inference `mode`: per_image runs it image by
    image, the other modes on the whole batch."""
    with inference(module, mode, dropout):
        if mode == "per_image":
            return per_image(fn, x, z)
        return fn(x, z)
