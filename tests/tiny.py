"""Tiny configs (small widths, 32×32) shared by the model tests."""

import torch

from models import MODELS

TINY = {
    "cyclegan": dict(ngf=4, ndf=4, n_blocks=1),
    "dualgan": dict(ngf=4, ndf=4, num_downs=5),
    "bicyclegan": dict(ngf=4, ndf=4, nef=4, num_downs=5, e_blocks=3, n_layers_d=2),  # 2-scale D at 32²
    "cogan": dict(ngf=8, ndf=8, image_size=32, nz=16),
    "pix2pix": dict(ngf=4, ndf=4, num_downs=5),
}


def tiny_model(name, lr=None, **overrides):
    """(spec, cfg, nets, optimizers); `lr` None = the paper's rate."""
    spec = MODELS[name]
    cfg = spec.Config(**{**TINY[name], **overrides})
    nets = spec.build_nets(cfg)
    return spec, cfg, nets, spec.make_optimizers(cfg, nets, lr)


def tiny_batch(cfg, n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda c: torch.rand(n, c, size, size, generator=g) * 2 - 1  # noqa: E731
    return {"a": make(cfg.channels_a), "b": make(cfg.channels_b)}
