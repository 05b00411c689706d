"""DualGAN (Yi et al., ICCV 2017), seed 000 and duxingren14/DualGAN.

Names: the paper's G_A: U→V and G_B: V→U are `G_ab` and `G_ba`; D_A (judging V) and D_B
(judging U) are `D_b` and `D_a`. λ_U and λ_V are `lambda_a` and `lambda_b`, the weights of the
reconstruction errors of domain a and domain b.

Defaults follow the paper (Algorithm 1): WGAN loss with weight clipping 0.01, n_critic = 2 critic
updates per generator update, each on a fresh batch (`batches_per_step` = n_critic: the loop hands
`train_step` n_critic batches; the generator update uses the last), RMSProp at 5e-5, λ = 500,
batch size 1.

The reference code (duxingren14/DualGAN master) defaults elsewhere: `GAN_type=wgan-gp` (γ = 10)
and `n_critic=1` in main.py. Each training batch there gets one critic update, and every
n_critic-th batch also a generator update on that same batch, so its critic too sees a fresh batch
per update. Its `classic` type (cross-entropy) trains G twice per critic step; its default critic
ends in a linear layer (`globalgan`) and keeps batch norm under wgan-gp. Master's settings are an
option here: `loss=wgan-gp n_critic=1`; our wgan-gp critic has no batch norm (critic_norm auto =
none: the penalty is per sample), a deliberate deviation.

RMSProp is TF1's RMSPropOptimizer(decay=0.9, epsilon=1e-10), the optimiser of the reference code.
TF1 starts the mean-square accumulator at 1, torch at 0: `make_optimizers` pre-fills torch's state
with ones (otherwise the first update is lr·g/sqrt(0.1·g²) ≈ 3.2·lr for every parameter, whatever
its gradient). TF1 adds epsilon inside the square root, torch outside; eps = 1e-10 outside here,
which differs from TF1 only where the accumulator falls to about 1e-10.

The generator norm is a choice (`batch | batch_renorm | instance | none`): seed 000 is about how
batch norm's running statistics make eval-mode outputs differ from train-mode ones.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import PatchDiscriminator, UnetGenerator, init_weights, set_requires_grad
from models.losses import discriminator_loss, gan_loss, gradient_penalty, reported
from models.norms import NORM_KINDS

DUALGAN_LOSSES = ("wgan", "wgan-gp", "lsgan")


LR = 5e-5  # the paper's learning rate: the default of a run's optim.lr


@dataclass
class Config:
    channels_a: int = field(default=3, metadata={"min": 1})
    channels_b: int = field(default=3, metadata={"min": 1})
    ngf: int = field(default=64, metadata={"min": 1})
    ndf: int = field(default=64, metadata={"min": 1})
    num_downs: int = field(default=8, metadata={"min": 2})  # U-Net depth: 8 for 256², 5 for 32²
    n_layers_d: int = field(default=3, metadata={"min": 1})
    norm: str = field(default="batch", metadata={"choices": NORM_KINDS})  # the generator's
    critic_norm: str = field(default="auto", metadata={"choices": ("auto", *NORM_KINDS)})
    # auto = batch, or none for wgan-gp (its penalty is per sample)
    use_dropout: bool = True
    loss: str = field(default="wgan", metadata={"choices": DUALGAN_LOSSES})
    n_critic: int = field(default=2, metadata={"min": 1})
    clip_value: float = 0.01
    gp_weight: float = 10.0
    lambda_a: float = 500.0
    lambda_b: float = 500.0
    recon_metric: str = field(default="l1", metadata={"choices": ("l1", "l2")})
    optimizer: str = field(default="rmsprop", metadata={"choices": ("rmsprop", "adam")})
    betas: tuple[float, float] = field(default=(0.5, 0.999), metadata={"below": 1})  # only for optimizer=adam
    init_gain: float = 0.02


def critic_norm(cfg):
    if cfg.critic_norm == "auto":
        return "none" if cfg.loss == "wgan-gp" else "batch"
    if cfg.loss == "wgan-gp" and cfg.critic_norm in ("batch", "batch_renorm"):
        raise ValueError("a WGAN-GP critic takes no batch norm (the gradient penalty is per sample): "
                         "set critic_norm to instance, none or auto")
    return cfg.critic_norm


def validate(cfg):
    if cfg.loss not in DUALGAN_LOSSES:
        raise ValueError(f"unknown DualGAN loss {cfg.loss!r}; choose one of {', '.join(DUALGAN_LOSSES)}")
    if cfg.norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {cfg.norm!r}; choose one of {', '.join(NORM_KINDS)}")
    if cfg.recon_metric not in ("l1", "l2"):
        raise ValueError(f"recon_metric must be l1 or l2, got {cfg.recon_metric!r}")
    if cfg.n_critic < 1:
        raise ValueError(f"n_critic must be >= 1, got {cfg.n_critic}")


def build_nets(cfg):
    validate(cfg)
    g = lambda c_in, c_out: UnetGenerator((c_in, c_out), cfg.num_downs, cfg.ngf, cfg.norm, cfg.use_dropout)  # noqa: E731
    d = lambda c: PatchDiscriminator(c, cfg.ndf, cfg.n_layers_d, critic_norm(cfg))  # noqa: E731
    nets = nn.ModuleDict({
        "G_ab": g(cfg.channels_a, cfg.channels_b), "G_ba": g(cfg.channels_b, cfg.channels_a),
        "D_a": d(cfg.channels_a), "D_b": d(cfg.channels_b),
    })
    return init_weights(nets, cfg.init_gain)


def tf1_rmsprop(params, lr):
    """torch's RMSprop set up as TF1's RMSPropOptimizer(decay=0.9, epsilon=1e-10): the accumulator
    starts at 1. torch fills a parameter's state only while it is empty, and checkpoints replace it."""
    opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-10)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0),
                            "square_avg": torch.ones_like(p, memory_format=torch.preserve_format)}
    return opt


def make_optimizers(cfg, nets, lr):
    def opt(*names):
        params = [p for n in names for p in nets[n].parameters()]
        if cfg.optimizer == "rmsprop":
            return tf1_rmsprop(params, lr)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas))
        raise ValueError(f"optimizer must be rmsprop or adam, got {cfg.optimizer!r}")
    return {"G": opt("G_ab", "G_ba"), "D": opt("D_a", "D_b")}


def recon_error(x, target, metric):
    return F.l1_loss(x.float(), target.float()) if metric == "l1" else F.mse_loss(x.float(), target.float())


def critic_step(cfg, nets, optimizers, real_a, real_b):
    with torch.no_grad():
        fake_b, fake_a = nets["G_ab"](real_a), nets["G_ba"](real_b)
    optimizers["D"].zero_grad(set_to_none=True)
    loss_b = discriminator_loss(nets["D_b"], real_b, fake_b, cfg.loss)
    loss_a = discriminator_loss(nets["D_a"], real_a, fake_a, cfg.loss)
    out = {"loss/D/a": loss_a, "loss/D/b": loss_b}
    total = loss_a + loss_b
    if cfg.loss == "wgan-gp":
        out["loss/D/gp_a"] = gradient_penalty(nets["D_a"], real_a, fake_a, cfg.gp_weight)
        out["loss/D/gp_b"] = gradient_penalty(nets["D_b"], real_b, fake_b, cfg.gp_weight)
        total = total + out["loss/D/gp_a"] + out["loss/D/gp_b"]
    total.backward()
    optimizers["D"].step()
    if cfg.loss == "wgan":
        with torch.no_grad():
            for name in ("D_a", "D_b"):
                for p in nets[name].parameters():
                    p.clamp_(-cfg.clip_value, cfg.clip_value)
    return out


def generator_step(cfg, nets, optimizers, real_a, real_b):
    G_ab, G_ba, D_a, D_b = nets["G_ab"], nets["G_ba"], nets["D_a"], nets["D_b"]
    set_requires_grad([D_a, D_b], False)
    optimizers["G"].zero_grad(set_to_none=True)
    fake_b, fake_a = G_ab(real_a), G_ba(real_b)
    out = {
        "loss/G/gan_ab": gan_loss(D_b(fake_b), True, cfg.loss),
        "loss/G/gan_ba": gan_loss(D_a(fake_a), True, cfg.loss),
        "loss/G/recon_a": recon_error(G_ba(fake_b), real_a, cfg.recon_metric) * cfg.lambda_a,
        "loss/G/recon_b": recon_error(G_ab(fake_a), real_b, cfg.recon_metric) * cfg.lambda_b,
    }
    out["loss/G/total"] = sum(out.values())
    out["loss/G/total"].backward()
    optimizers["G"].step()
    set_requires_grad([D_a, D_b], True)
    return out


def batches_per_step(cfg):
    """Algorithm 1 samples a fresh batch for every critic update."""
    return cfg.n_critic


def train_step(cfg, nets, optimizers, batch, state):
    """n_critic critic updates, update i on batch i, then one update of both generators on the
    last batch. `batch` is the list of n_critic batches the loop draws; a single dict serves every
    update (the critic then sees it n_critic times). The D losses reported are the last update's."""
    state.setdefault("step", 0)
    batches = list(batch) if isinstance(batch, list | tuple) else [batch] * cfg.n_critic
    if len(batches) != cfg.n_critic:
        raise ValueError(f"DualGAN takes n_critic={cfg.n_critic} batches per step, got {len(batches)}")
    for b in batches:
        out = critic_step(cfg, nets, optimizers, b["a"], b["b"])
    out.update(generator_step(cfg, nets, optimizers, batches[-1]["a"], batches[-1]["b"]))
    if cfg.loss in ("wgan", "wgan-gp"):
        # −(critic loss) estimates the Wasserstein distance: the curve WGAN users watch.
        out["loss/D/wasserstein_a"] = -out["loss/D/a"]
        out["loss/D/wasserstein_b"] = -out["loss/D/b"]
    state["step"] += 1
    return reported(out)


@torch.no_grad()
def translate(cfg, nets, x, direction="ab", z=None):
    if direction not in ("ab", "ba"):
        raise ValueError(f"direction must be 'ab' or 'ba', got {direction!r}")
    return nets["G_" + direction](x)
