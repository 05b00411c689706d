"""BicycleGAN against junyanz/BicycleGAN's facades setting: two-scale D, z at every encoder layer,
Xavier init, per-scale GAN losses summed."""

import pytest
import torch
from torch import nn

from models import bicyclegan
from models.layers import MultiscaleDiscriminator, init_weights
from models.losses import gan_loss
from tests.tiny import tiny_model


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_two_scale_d_is_basic_256_multi():
    cfg = bicyclegan.Config()
    assert cfg.num_Ds == 2
    disc = bicyclegan.discriminator(cfg)
    assert n_params(disc) == 3_458_978  # the reference's D_NLayersMulti(3, 64, 3, num_D=2)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        maps = disc(x)
        # the second scale scores the input mean-pooled 3×3 / 2, borders averaged over the image only
        pooled = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)(x)
        assert torch.allclose(maps[1], disc.scales[1](pooled))
    assert [m.shape for m in maps] == [(1, 1, 30, 30), (1, 1, 14, 14)]
    assert n_params(bicyclegan.discriminator(bicyclegan.Config(num_Ds=1))) == 2_764_737  # one PatchGAN


def test_multi_scale_d_names_a_too_small_input():
    with pytest.raises(ValueError, match="scale 1 .* 16×16 px, too small for n_layers=3"):
        MultiscaleDiscriminator(3, 4, 3)(torch.zeros(1, 3, 32, 32))


def test_gan_losses_sum_over_scales_and_d_adds_real_and_fake():
    preds = [torch.full((1, 1, 3, 3), 0.5), torch.full((1, 1, 2, 2), 2.0)]
    expected = gan_loss(preds[0], True, "lsgan") + gan_loss(preds[1], True, "lsgan")
    assert bicyclegan.scales_loss(preds, True, "lsgan") == pytest.approx(float(expected))

    def disc(x):  # scores 0 everywhere at two scales: lsgan gives 1 per real map, 0 per fake map
        return [torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 2, 2)]

    # Two scales × real loss 1, no ×0.5 (the reference's backward_D).
    assert float(bicyclegan.d_loss(disc, None, None, "lsgan")) == pytest.approx(2.0)


def test_z_reaches_every_encoder_layer():
    _, cfg, nets, _ = tiny_model("bicyclegan")
    assert cfg.z_all_layers
    g = nets["G"]
    inputs = []

    def keep(module, args):  # a copy: the LeakyReLU that opens each layer works in place
        inputs.append(args[0].clone())

    hooks = [layer.register_forward_pre_hook(keep) for layer in g.down]
    a, z = torch.randn(2, cfg.channels_a, 32, 32), torch.randn(2, cfg.nz)
    with torch.no_grad():
        g(a, z)
    for h in hooks:
        h.remove()
    assert len(inputs) == len(g.down) == cfg.num_downs
    for layer, x in zip(g.down, inputs, strict=True):
        conv = next(m for m in layer if isinstance(m, nn.Conv2d))
        assert conv.in_channels == x.shape[1]
        tiled = z[:, :, None, None].expand(-1, -1, *x.shape[2:])
        assert torch.equal(x[:, -cfg.nz:], tiled)  # the last nz channels are z, down to 1×1


def test_xavier_init_with_gain():
    conv, bn = nn.Conv2d(64, 128, 4), nn.BatchNorm2d(256)
    init_weights(nn.ModuleList([conv, bn]), 0.02, "xavier")
    xavier_std = 0.02 * (2 / (64 * 16 + 128 * 16)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert not conv.bias.any()
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01) and bn.weight.std() > 0.01
    _, cfg, nets, _ = tiny_model("bicyclegan")
    assert cfg.init_type == "xavier"
    w = nets["G"].down[1][1].weight  # 8 × (4 + nz) × 4 × 4
    fan_in, fan_out = w.shape[1] * 16, w.shape[0] * 16
    assert w.std().item() == pytest.approx(0.02 * (2 / (fan_in + fan_out)) ** 0.5, rel=0.15)
    with pytest.raises(ValueError, match="unknown init_type"):
        init_weights(conv, 0.02, "kaiming")
