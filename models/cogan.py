"""CoGAN (Liu & Tuzel, NeurIPS 2016), seed 004, DCGAN-style as the seed.

Two GANs whose weights are tied where the paper ties them:
- generators share their FIRST layers (which decode high-level semantics from z) and keep
  separate LAST layers (which render domain-specific detail);
- discriminators keep separate FIRST layers (low-level features of each domain) and share their
  LAST layers (high-level evidence). A popular port shares D's first layers instead; that is the
  wrong way round.
Each coupled pair is one module (`G`, `D`) so that the shared layers are one set of Parameters.
Batches hold unpaired real samples of the two domains; the coupling alone makes G(z) a pair.

Option `g_updates_per_d=2` updates G twice per D update as the seed does; the paper updates once.
Adam with weight decay 0.0005 on every parameter of G and D, as the reference code.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from models.layers import init_weights, set_requires_grad
from models.losses import GAN_MODES, gan_loss, reported

LR = 2e-4  # the paper's learning rate: the default of a run's optim.lr


@dataclass
class Config:
    channels_a: int = field(default=1, metadata={"min": 1})
    channels_b: int = field(default=1, metadata={"min": 1})
    image_size: int = field(default=28, metadata={"min": 4})  # 28 or 32 (any multiple of 4)
    nz: int = field(default=100, metadata={"min": 1})
    ngf: int = field(default=64, metadata={"min": 1})
    ndf: int = field(default=64, metadata={"min": 1})
    gan_mode: str = field(default="vanilla", metadata={"choices": GAN_MODES})
    g_updates_per_d: int = field(default=1, metadata={"min": 1})
    betas: tuple[float, float] = field(default=(0.5, 0.999), metadata={"below": 1})
    weight_decay: float = 0.0005  # Adam's L2 term, as mingyuliutw/CoGAN's trainers and solvers
    init_gain: float = 0.02


def upsampling_plan(image_size):
    """(start size, number of ×2 upsamplings): 32 → (4, 3), 28 → (7, 2)."""
    if image_size % 4:
        raise ValueError(f"CoGAN image_size must be a multiple of 4 (28 or 32), got {image_size}")
    n_up = 3 if image_size % 8 == 0 else 2
    return image_size // 2**n_up, n_up


def up_block(c_in, c_out):
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class CoupledGenerator(nn.Module):
    """z → (x_a, x_b). `shared`: FC + all but the last upsampling; `head_a`/`head_b`: last layer."""

    def __init__(self, cfg):
        super().__init__()
        start, n_up = upsampling_plan(cfg.image_size)
        width = cfg.ngf * 2 ** (n_up - 1)
        self.start, self.width = start, width
        self.fc = nn.Sequential(
            nn.Linear(cfg.nz, width * start * start, bias=False),
            nn.BatchNorm1d(width * start * start),
            nn.ReLU(True),
        )
        blocks = []
        for _ in range(n_up - 1):
            blocks.append(up_block(width, width // 2))
            width //= 2
        self.trunk = nn.Sequential(*blocks)
        self.head_a = nn.Sequential(nn.ConvTranspose2d(width, cfg.channels_a, 4, 2, 1), nn.Tanh())
        self.head_b = nn.Sequential(nn.ConvTranspose2d(width, cfg.channels_b, 4, 2, 1), nn.Tanh())

    def shared_parameters(self):
        return list(self.fc.parameters()) + list(self.trunk.parameters())

    def branch_parameters(self, domain):
        """Every parameter the generator of `domain` ('a' or 'b') uses."""
        return self.shared_parameters() + list(getattr(self, "head_" + domain).parameters())

    def forward(self, z):
        h = self.fc(z).view(z.shape[0], self.width, self.start, self.start)
        h = self.trunk(h)
        return self.head_a(h), self.head_b(h)


class CoupledDiscriminator(nn.Module):
    """(x_a, x_b) → (score_a, score_b). `head_a`/`head_b`: first conv; `shared`: the rest.
    No batch norm in the shared layers: its statistics would mix the two domains' batches."""

    def __init__(self, cfg):
        super().__init__()
        ndf = cfg.ndf
        first = lambda c: nn.Sequential(nn.Conv2d(c, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True))  # noqa: E731
        self.head_a, self.head_b = first(cfg.channels_a), first(cfg.channels_b)
        size = cfg.image_size // 4
        self.shared = nn.Sequential(
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1),
            nn.LeakyReLU(0.2, True),
            nn.Flatten(),
            nn.Linear(ndf * 2 * size * size, 1),
        )

    def shared_parameters(self):
        return list(self.shared.parameters())

    def branch_parameters(self, domain):
        """Every parameter the discriminator of `domain` ('a' or 'b') uses."""
        return list(getattr(self, "head_" + domain).parameters()) + self.shared_parameters()

    def forward(self, x_a, x_b):
        return self.shared(self.head_a(x_a)), self.shared(self.head_b(x_b))


def build_nets(cfg):
    nets = nn.ModuleDict({"G": CoupledGenerator(cfg), "D": CoupledDiscriminator(cfg)})
    return init_weights(nets, cfg.init_gain)


def make_optimizers(cfg, nets, lr):
    return {
        name: torch.optim.Adam(
            nets[name].parameters(), lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        for name in ("G", "D")
    }


def sample_z(cfg, n, like):
    return torch.randn(n, cfg.nz, device=like.device, dtype=like.dtype)


def discriminator_step(cfg, nets, optimizers, real_a, real_b):
    n = min(real_a.shape[0], real_b.shape[0])
    with torch.no_grad():
        fake_a, fake_b = nets["G"](sample_z(cfg, n, real_a))
    optimizers["D"].zero_grad(set_to_none=True)
    real_sa, real_sb = nets["D"](real_a, real_b)
    fake_sa, fake_sb = nets["D"](fake_a, fake_b)
    out = {
        "loss/D/a": gan_loss(real_sa, True, cfg.gan_mode) + gan_loss(fake_sa, False, cfg.gan_mode),
        "loss/D/b": gan_loss(real_sb, True, cfg.gan_mode) + gan_loss(fake_sb, False, cfg.gan_mode),
    }
    (out["loss/D/a"] + out["loss/D/b"]).backward()
    optimizers["D"].step()
    return out


def generator_step(cfg, nets, optimizers, n, like):
    set_requires_grad([nets["D"]], False)
    optimizers["G"].zero_grad(set_to_none=True)
    score_a, score_b = nets["D"](*nets["G"](sample_z(cfg, n, like)))
    out = {
        "loss/G/a": gan_loss(score_a, True, cfg.gan_mode),
        "loss/G/b": gan_loss(score_b, True, cfg.gan_mode),
    }
    (out["loss/G/a"] + out["loss/G/b"]).backward()
    optimizers["G"].step()
    set_requires_grad([nets["D"]], True)
    return out


def train_step(cfg, nets, optimizers, batch, state):
    """One G update; D is updated first on every `g_updates_per_d`-th call."""
    state.setdefault("step", 0)
    real_a, real_b = batch["a"], batch["b"]
    out = {}
    if state["step"] % cfg.g_updates_per_d == 0:
        out.update(discriminator_step(cfg, nets, optimizers, real_a, real_b))
    out.update(generator_step(cfg, nets, optimizers, real_a.shape[0], real_a))
    state["step"] += 1
    return reported(out)


@torch.no_grad()
def translate(cfg, nets, x=None, direction="ab", z=None):
    """CoGAN generates rather than translates: returns a pair (x_a, x_b) from z (or from
    N(0, I) draws, as many as x has rows, 16 if x is None too)."""
    if z is None:
        n = 16 if x is None else x.shape[0]
        device = next(nets["G"].parameters()).device
        z = torch.randn(n, cfg.nz, device=device)
    return nets["G"](z)
