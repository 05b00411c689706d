"""pix2pix (Isola et al., CVPR 2017): BicycleGAN's baseline, from the same parts.

U-Net generator (batch norm, dropout), conditional 70×70 PatchGAN that sees A and B stacked,
vanilla GAN loss plus L1 weighted 100, Adam 2e-4 (0.5, 0.999); D is updated, then G, as the
reference code does. Names: netG is `G_ab`, netD is `D`.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import PatchDiscriminator, UnetGenerator, init_weights, set_requires_grad
from models.losses import GAN_MODES, gan_loss, reported
from models.norms import NORM_KINDS

LR = 2e-4  # the paper's learning rate: the default of a run's optim.lr


@dataclass
class Config:
    channels_a: int = field(default=3, metadata={"min": 1})
    channels_b: int = field(default=3, metadata={"min": 1})
    ngf: int = field(default=64, metadata={"min": 1})
    ndf: int = field(default=64, metadata={"min": 1})
    num_downs: int = field(default=8, metadata={"min": 2})
    n_layers_d: int = field(default=3, metadata={"min": 1})
    norm: str = field(default="batch", metadata={"choices": NORM_KINDS})
    use_dropout: bool = True
    gan_mode: str = field(default="vanilla", metadata={"choices": GAN_MODES})
    lambda_l1: float = 100.0
    betas: tuple[float, float] = field(default=(0.5, 0.999), metadata={"below": 1})
    init_gain: float = 0.02


def build_nets(cfg):
    nets = nn.ModuleDict(
        {
            "G_ab": UnetGenerator(
                (cfg.channels_a, cfg.channels_b), cfg.num_downs, cfg.ngf, cfg.norm, cfg.use_dropout
            ),
            "D": PatchDiscriminator(cfg.channels_a + cfg.channels_b, cfg.ndf, cfg.n_layers_d, cfg.norm),
        }
    )
    return init_weights(nets, cfg.init_gain)


def make_optimizers(cfg, nets, lr):
    return {
        name: torch.optim.Adam(nets[key].parameters(), lr=lr, betas=tuple(cfg.betas))
        for name, key in (("G", "G_ab"), ("D", "D"))
    }


def train_step(cfg, nets, optimizers, batch, state):
    """One D update on (A, B) vs (A, G(A)), then one G update (GAN + λ·L1)."""
    state.setdefault("step", 0)
    a, b = batch["a"], batch["b"]
    fake = nets["G_ab"](a)
    optimizers["D"].zero_grad(set_to_none=True)
    d_real = gan_loss(nets["D"](torch.cat([a, b], 1)), True, cfg.gan_mode)
    d_fake = gan_loss(nets["D"](torch.cat([a, fake.detach()], 1)), False, cfg.gan_mode)
    loss_d = 0.5 * (d_real + d_fake)
    loss_d.backward()
    optimizers["D"].step()

    set_requires_grad([nets["D"]], False)
    optimizers["G"].zero_grad(set_to_none=True)
    g_gan = gan_loss(nets["D"](torch.cat([a, fake], 1)), True, cfg.gan_mode)
    g_l1 = F.l1_loss(fake.float(), b.float()) * cfg.lambda_l1
    (g_gan + g_l1).backward()
    optimizers["G"].step()
    set_requires_grad([nets["D"]], True)
    state["step"] += 1
    out = {"loss/D/total": loss_d, "loss/G/gan": g_gan, "loss/G/l1": g_l1, "loss/G/total": g_gan + g_l1}
    return reported(out)


@torch.no_grad()
def translate(cfg, nets, x, direction="ab", z=None):
    if direction != "ab":
        raise ValueError(f"pix2pix translates a → b only, got {direction!r}")
    return nets["G_ab"](x)
