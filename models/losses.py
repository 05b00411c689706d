"""GAN objectives (lsgan, vanilla, wgan, wgan-gp), gradient penalty and the VAE's KL term."""

import torch
import torch.nn.functional as F

GAN_MODES = ("lsgan", "vanilla", "wgan", "wgan-gp")


def gan_loss(pred, target_is_real, mode):
    """Loss of discriminator scores `pred` against the real (True) or fake (False) label.

    lsgan: mean squared error to 1/0; vanilla: BCE with logits; wgan / wgan-gp: −mean for real,
    +mean for fake (the critic maximises real − fake). Computed in fp32 under autocast.
    """
    pred = pred.float()
    if mode == "lsgan":
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return F.mse_loss(pred, target)
    if mode == "vanilla":
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return F.binary_cross_entropy_with_logits(pred, target)
    if mode in ("wgan", "wgan-gp"):
        return -pred.mean() if target_is_real else pred.mean()
    raise ValueError(f"unknown GAN loss {mode!r}; choose one of {', '.join(GAN_MODES)}")


def discriminator_loss(disc, real, fake, mode):
    """Both halves of a discriminator's loss; `fake` must already be detached.

    lsgan/vanilla average the two halves (×0.5, as CycleGAN) so D learns at half G's rate.
    """
    loss_real = gan_loss(disc(real), True, mode)
    loss_fake = gan_loss(disc(fake), False, mode)
    if mode in ("wgan", "wgan-gp"):
        return loss_real + loss_fake
    return 0.5 * (loss_real + loss_fake)


def gradient_penalty(disc, real, fake, weight=10.0):
    """WGAN-GP: weight · E[(‖∇D(x̂)‖₂ − 1)²] at random per-sample interpolates x̂ of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    scores = disc(mixed).float()
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grads.flatten(1).norm(2, dim=1)
    return weight * ((norms - 1.0) ** 2).mean()


def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) ‖ N(0, I)), summed over latent dims and batch (BicycleGAN's form)."""
    return -0.5 * torch.sum(1 + logvar.float() - mu.float().pow(2) - logvar.float().exp())


def reported(losses: dict) -> dict:
    """A step's losses as the contract returns them: detached fp32 0-dim tensors, left on the
    device, so that returning them costs no host sync (the loop reads them in batches)."""
    return {k: v.detach().float() for k, v in losses.items()}
