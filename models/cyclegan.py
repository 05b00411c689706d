"""CycleGAN (Zhu et al., ICCV 2017), as in pytorch-CycleGAN-and-pix2pix and seeds 002/003.

Names: the paper's G: X→Y and F: Y→X are `G_ab` and `G_ba`; D_Y and D_X are `D_b` and `D_a`
(each named by the domain it judges; the reference code calls them netD_A and netD_B the other
way round). lambda_A/lambda_B are `lambda_cycle`; lambda_identity is `lambda_identity`, a fraction
of lambda_cycle as in the reference code.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.image_pool import ImagePool
from models.layers import PatchDiscriminator, ResnetGenerator, init_weights, set_requires_grad
from models.losses import GAN_MODES, discriminator_loss, gan_loss, reported
from models.norms import NORM_KINDS

LR = 2e-4  # the paper's learning rate: the default of a run's optim.lr


@dataclass
class Config:
    channels_a: int = field(default=3, metadata={"min": 1})
    channels_b: int = field(default=3, metadata={"min": 1})
    ngf: int = field(default=64, metadata={"min": 1})
    ndf: int = field(default=64, metadata={"min": 1})
    n_blocks: int = 9  # 9 for 256², 6 for 128² (the paper)
    n_layers_d: int = field(default=3, metadata={"min": 1})  # 3 gives the 70×70 PatchGAN
    norm: str = field(default="instance", metadata={"choices": NORM_KINDS})
    use_dropout: bool = False
    gan_mode: str = field(default="lsgan", metadata={"choices": GAN_MODES})  # or "vanilla"
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # identity weight = lambda_identity · lambda_cycle; 0 disables
    pool_size: int = 50
    betas: tuple[float, float] = field(default=(0.5, 0.999), metadata={"below": 1})
    init_gain: float = 0.02


def build_nets(cfg):
    g = lambda c_in, c_out: ResnetGenerator(c_in, c_out, cfg.ngf, cfg.norm, cfg.n_blocks, cfg.use_dropout)  # noqa: E731
    d = lambda c: PatchDiscriminator(c, cfg.ndf, cfg.n_layers_d, cfg.norm)  # noqa: E731
    nets = nn.ModuleDict({
        "G_ab": g(cfg.channels_a, cfg.channels_b), "G_ba": g(cfg.channels_b, cfg.channels_a),
        "D_a": d(cfg.channels_a), "D_b": d(cfg.channels_b),
    })
    return init_weights(nets, cfg.init_gain)


def make_optimizers(cfg, nets, lr):
    adam = lambda *names: torch.optim.Adam(  # noqa: E731
        [p for n in names for p in nets[n].parameters()], lr=lr, betas=tuple(cfg.betas))
    return {"G": adam("G_ab", "G_ba"), "D": adam("D_a", "D_b")}


def init_state(cfg):
    return {"step": 0, "pool_a": ImagePool(cfg.pool_size), "pool_b": ImagePool(cfg.pool_size)}


def train_step(cfg, nets, optimizers, batch, state):
    """One generator update of both G's, then one update of both D's on pooled fakes."""
    if cfg.lambda_identity > 0 and cfg.channels_a != cfg.channels_b:
        raise ValueError("identity loss needs channels_a == channels_b; set lambda_identity=0")
    for key, value in init_state(cfg).items():
        state.setdefault(key, value)
    real_a, real_b = batch["a"], batch["b"]
    G_ab, G_ba, D_a, D_b = nets["G_ab"], nets["G_ba"], nets["D_a"], nets["D_b"]

    fake_b, fake_a = G_ab(real_a), G_ba(real_b)
    rec_a, rec_b = G_ba(fake_b), G_ab(fake_a)

    set_requires_grad([D_a, D_b], False)  # D takes no gradient from the generator loss
    optimizers["G"].zero_grad(set_to_none=True)
    loss = {
        "loss/G/gan_ab": gan_loss(D_b(fake_b), True, cfg.gan_mode),
        "loss/G/gan_ba": gan_loss(D_a(fake_a), True, cfg.gan_mode),
        "loss/G/cycle_a": F.l1_loss(rec_a.float(), real_a.float()) * cfg.lambda_cycle,
        "loss/G/cycle_b": F.l1_loss(rec_b.float(), real_b.float()) * cfg.lambda_cycle,
    }
    if cfg.lambda_identity > 0:
        weight = cfg.lambda_cycle * cfg.lambda_identity
        loss["loss/G/identity_a"] = F.l1_loss(G_ba(real_a).float(), real_a.float()) * weight
        loss["loss/G/identity_b"] = F.l1_loss(G_ab(real_b).float(), real_b.float()) * weight
    loss_g = sum(loss.values())
    loss_g.backward()
    optimizers["G"].step()
    set_requires_grad([D_a, D_b], True)

    optimizers["D"].zero_grad(set_to_none=True)
    loss["loss/D/b"] = discriminator_loss(D_b, real_b, state["pool_b"].query(fake_b.detach()), cfg.gan_mode)
    loss["loss/D/a"] = discriminator_loss(D_a, real_a, state["pool_a"].query(fake_a.detach()), cfg.gan_mode)
    (loss["loss/D/a"] + loss["loss/D/b"]).backward()
    optimizers["D"].step()
    state["step"] += 1
    loss["loss/G/total"] = loss_g
    return reported(loss)


@torch.no_grad()
def translate(cfg, nets, x, direction="ab", z=None):
    if direction not in ("ab", "ba"):
        raise ValueError(f"direction must be 'ab' or 'ba', got {direction!r}")
    return nets["G_" + direction](x)
