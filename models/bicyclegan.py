"""BicycleGAN (Zhu et al., NeurIPS 2017), seed 001 and junyanz/BicycleGAN.

One generator G(A, z) → B, an encoder E(B) → (μ, log σ²), and two discriminators: `D` for the
cVAE-GAN cycle (B → z → B̂) and `D2` for the cLR-GAN cycle (z → B̂ → ẑ). Each batch of aligned
pairs is split in halves: the first half feeds cVAE-GAN, the second gives the real B images that
D2 sees. Loss weights as the paper: L1 10, KL 0.01, latent regression 0.5; the latent regression
updates G alone (E is held fixed for that term), as the reference code does.

Defaults follow the reference's facades setting (options and scripts/train_facades.sh):
- G is the U-Net with z concatenated at every encoder layer (`where_add='all'`);
- D and D2 are two-scale PatchGANs (`basic_256_multi`, `num_Ds=2`; `num_Ds=1` is one PatchGAN);
  each loss sums the per-scale GAN losses, and D's loss is real + fake without CycleGAN's ×0.5,
  as the reference's GANLoss and backward_D;
- all nets start from Xavier-normal weights with gain 0.02 (`init_type='xavier'`).
The facades script also turns dropout on (`--use_dropout`); `use_dropout` stays off here and
the recipe sets it. For 128² and smaller the reference uses `basic_128_multi`: n_layers_d=2.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (
    INIT_TYPES,
    MultiscaleDiscriminator,
    PatchDiscriminator,
    ResnetEncoder,
    UnetGenerator,
    init_weights,
    set_requires_grad,
)
from models.losses import GAN_MODES, gan_loss, kl_to_standard_normal, reported
from models.norms import NORM_KINDS

LR = 2e-4  # the paper's learning rate: the default of a run's optim.lr


@dataclass
class Config:
    channels_a: int = field(default=3, metadata={"min": 1})
    channels_b: int = field(default=3, metadata={"min": 1})
    nz: int = field(default=8, metadata={"min": 1})
    z_all_layers: bool = True  # True: z at every encoder layer ('all'); False: at the input ('input')
    ngf: int = field(default=64, metadata={"min": 1})
    ndf: int = field(default=64, metadata={"min": 1})
    nef: int = field(default=64, metadata={"min": 1})
    num_downs: int = field(default=8, metadata={"min": 2})  # U-Net depth: 8 for 256², 7 for 128², 5 for 32²
    e_blocks: int = 4
    n_layers_d: int = field(default=3, metadata={"min": 1})
    # D and D2 score at this many scales (the reference's num_Ds); 1: one PatchGAN
    num_Ds: int = field(default=2, metadata={"min": 1})
    norm: str = field(default="instance", metadata={"choices": NORM_KINDS})
    use_dropout: bool = False
    gan_mode: str = field(default="lsgan", metadata={"choices": GAN_MODES})
    lambda_l1: float = 10.0
    lambda_kl: float = 0.01
    lambda_z: float = 0.5
    lambda_gan: float = 1.0
    lambda_gan2: float = 1.0
    betas: tuple[float, float] = field(default=(0.5, 0.999), metadata={"below": 1})
    init_gain: float = 0.02
    # the reference's default for BicycleGAN ('normal' as pix2pix)
    init_type: str = field(default="xavier", metadata={"choices": INIT_TYPES})


def build_nets(cfg):
    nets = nn.ModuleDict({
        "G": UnetGenerator((cfg.channels_a, cfg.channels_b), cfg.num_downs, cfg.ngf, cfg.norm,
                           cfg.use_dropout, nz=cfg.nz, z_all_layers=cfg.z_all_layers),
        "E": ResnetEncoder(cfg.channels_b, cfg.nz, cfg.nef, cfg.e_blocks, cfg.norm),
        "D": discriminator(cfg),
        "D2": discriminator(cfg),
    })
    return init_weights(nets, cfg.init_gain, cfg.init_type)


def discriminator(cfg):
    if cfg.num_Ds == 1:
        return PatchDiscriminator(cfg.channels_b, cfg.ndf, cfg.n_layers_d, cfg.norm)
    return MultiscaleDiscriminator(cfg.channels_b, cfg.ndf, cfg.n_layers_d, cfg.norm, cfg.num_Ds)


def scales_loss(preds, target_is_real, mode):
    """GAN loss summed over a multi-scale D's score maps (one map: its loss), as the reference."""
    preds = preds if isinstance(preds, list) else [preds]
    return sum(gan_loss(p, target_is_real, mode) for p in preds)


def d_loss(disc, real, fake, mode):
    """real + fake, each summed over scales; `fake` must be detached (the reference's backward_D)."""
    return scales_loss(disc(real), True, mode) + scales_loss(disc(fake), False, mode)


def make_optimizers(cfg, nets, lr):
    return {name: torch.optim.Adam(nets[name].parameters(), lr=lr, betas=tuple(cfg.betas))
            for name in ("G", "E", "D", "D2")}


def encode(E, b):
    """Reparameterised sample z = μ + σ·ε from q(z|b), plus μ and log σ²."""
    mu, logvar = E(b)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    return z, mu, logvar


def forward_cycles(cfg, nets, batch):
    a, b = batch["a"], batch["b"]
    half = a.shape[0] // 2
    if half < 1:
        raise ValueError("BicycleGAN splits each batch in halves for its two cycles: use batch size >= 2")
    f = {"a": a[:half], "b": b[:half], "b_random": b[half:2 * half]}
    f["z_encoded"], f["mu"], f["logvar"] = encode(nets["E"], f["b"])
    f["z_random"] = torch.randn(half, cfg.nz, device=a.device, dtype=a.dtype)
    f["fake_encoded"] = nets["G"](f["a"], f["z_encoded"])
    f["fake_random"] = nets["G"](f["a"], f["z_random"])
    return f


def generator_encoder_step(cfg, nets, optimizers, f):
    set_requires_grad([nets["D"], nets["D2"]], False)
    optimizers["G"].zero_grad(set_to_none=True)
    optimizers["E"].zero_grad(set_to_none=True)
    out = {
        "loss/G/gan_vae": scales_loss(nets["D"](f["fake_encoded"]), True, cfg.gan_mode) * cfg.lambda_gan,
        "loss/G/gan_lr": scales_loss(nets["D2"](f["fake_random"]), True, cfg.gan_mode) * cfg.lambda_gan2,
        "loss/G/l1": F.l1_loss(f["fake_encoded"].float(), f["b"].float()) * cfg.lambda_l1,
        "loss/E/kl": kl_to_standard_normal(f["mu"], f["logvar"]) * cfg.lambda_kl,
    }
    sum(out.values()).backward(retain_graph=cfg.lambda_z > 0)
    if cfg.lambda_z > 0:
        # Latent regression |E(G(A, z)) − z| trains G alone: grads go to G's parameters only.
        mu2, _ = nets["E"](f["fake_random"])
        out["loss/G/z"] = F.l1_loss(mu2.float(), f["z_random"].float()) * cfg.lambda_z
        params = [p for p in nets["G"].parameters() if p.requires_grad]
        grads = torch.autograd.grad(out["loss/G/z"], params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    optimizers["E"].step()
    optimizers["G"].step()
    set_requires_grad([nets["D"], nets["D2"]], True)
    return out


def discriminator_step(cfg, nets, optimizers, f):
    optimizers["D"].zero_grad(set_to_none=True)
    optimizers["D2"].zero_grad(set_to_none=True)
    out = {
        "loss/D/vae": d_loss(nets["D"], f["b"], f["fake_encoded"].detach(), cfg.gan_mode),
        "loss/D/lr": d_loss(nets["D2"], f["b_random"], f["fake_random"].detach(), cfg.gan_mode),
    }
    (out["loss/D/vae"] + out["loss/D/lr"]).backward()
    optimizers["D"].step()
    optimizers["D2"].step()
    return out


def train_step(cfg, nets, optimizers, batch, state):
    """One update of G and E (cVAE-GAN + cLR-GAN + KL, then the z term for G alone), then D, D2."""
    state.setdefault("step", 0)
    f = forward_cycles(cfg, nets, batch)
    out = generator_encoder_step(cfg, nets, optimizers, f)
    out.update(discriminator_step(cfg, nets, optimizers, f))
    state["step"] += 1
    return reported(out)


@torch.no_grad()
def sample(nets, a, z):
    """G(a, z): one output per row of z (z is N×nz, matching a's batch, or 1×nz broadcast)."""
    if z.shape[0] == 1 and a.shape[0] > 1:
        z = z.expand(a.shape[0], -1)
    return nets["G"](a, z.to(a.device, a.dtype))


@torch.no_grad()
def translate(cfg, nets, x, direction="ab", z=None):
    """A → B for latent z; z=None draws z from the prior N(0, I) (pass zeros for the mean output)."""
    if direction != "ab":
        raise ValueError(f"BicycleGAN translates a → b only (its G is conditional on a), got {direction!r}")
    if z is None:
        z = torch.randn(x.shape[0], cfg.nz, device=x.device, dtype=x.dtype)
    return sample(nets, x, z)


def interpolation_z(nz, steps, z0=None, z1=None, generator=None):
    """`steps` codes on the segment z0 → z1 (random ends if not given): seed 001's 'linear' grid."""
    z0 = torch.randn(nz, generator=generator) if z0 is None else z0
    z1 = torch.randn(nz, generator=generator) if z1 is None else z1
    t = torch.linspace(0, 1, steps)[:, None]
    return (1 - t) * z0[None] + t * z1[None]
