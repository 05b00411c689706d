"""Building blocks shared by the GANs: ResNet generator, U-Net, PatchGAN (single and multi-scale),
ResNet encoder, init.

Architectures follow pytorch-CycleGAN-and-pix2pix (CycleGAN/pix2pix) and BicycleGAN's reference
code; the paper's names are kept in the docstrings where they differ from ours.
"""

import torch
from torch import nn

from models.norms import BatchRenorm2d, conv_bias, norm_layer

INIT_TYPES = ("normal", "xavier")


def init_weights(net, gain=0.02, init_type="normal"):
    """Conv/linear weights N(0, gain) ('normal', pix2pix/CycleGAN) or Xavier-normal with gain `gain`
    ('xavier', BicycleGAN's default); zero biases; batch-norm scales N(1, gain), shifts 0 whatever
    the init_type, as the reference init_weights does."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"unknown init_type {init_type!r}; choose one of {', '.join(INIT_TYPES)}")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            else:
                nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, BatchRenorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


class ResnetBlock(nn.Module):
    """Two reflection-padded 3×3 convs with a skip; no activation after the sum (as CycleGAN)."""

    def __init__(self, dim, norm="instance", use_dropout=False):
        super().__init__()
        bias = conv_bias(norm)
        layers = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=bias),
            norm_layer(norm, dim),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(norm, dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator: c7s1-ngf, two stride-2 downsamplings, n_blocks residual blocks,
    two transposed-conv upsamplings, c7s1-out with tanh and no norm on the output layer."""

    def __init__(self, in_channels=3, out_channels=3, ngf=64, norm="instance", n_blocks=9, use_dropout=False):
        super().__init__()
        bias = conv_bias(norm)
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(True),
        ]
        c = ngf
        for _ in range(2):
            layers += [nn.Conv2d(c, c * 2, 3, 2, 1, bias=bias), norm_layer(norm, c * 2), nn.ReLU(True)]
            c *= 2
        layers += [ResnetBlock(c, norm, use_dropout) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=bias),
                norm_layer(norm, c // 2),
                nn.ReLU(True),
            ]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def unet_widths(ngf, num_downs):
    """Channel width after each U-Net downsampling: ngf, 2ngf, 4ngf, then 8ngf (pix2pix)."""
    return [ngf * min(2**i, 8) for i in range(num_downs)]


class UnetGenerator(nn.Module):
    """pix2pix's U-Net: num_downs stride-2 4×4 convs down to 1×1 (8 for 256², 5 for 32²), mirrored
    transposed convs up, skip connections between mirrored layers, tanh output.

    Optional latent z (BicycleGAN): `nz > 0` tiles z over the image and concatenates it to the
    input (`z_all_layers=False`, BicycleGAN's 'input') or to the input of every encoder layer,
    the innermost included (`z_all_layers=True`, BicycleGAN's 'all', G_Unet_add_all: z joins
    before each layer's LeakyReLU as there, and the skips carry the features without z). Dropout
    0.5 in the inner 8ngf decoder layers as pix2pix when `use_dropout`. Layer for layer this is
    the reference's U-Net for num_downs >= 6; the reference builds no shallower 'all' U-Net, and
    it gives every conv a bias where ours drops it before batch norm (same under instance norm).
    """

    def __init__(
        self,
        channels=(3, 3),
        num_downs=8,
        ngf=64,
        norm="batch",
        use_dropout=False,
        nz=0,
        z_all_layers=False,
    ):
        super().__init__()
        in_channels, out_channels = channels  # (input, output): a pair keeps the signature short
        if num_downs < 2:
            raise ValueError(f"UnetGenerator needs num_downs >= 2, got {num_downs}")
        self.num_downs, self.nz, self.z_all_layers = num_downs, nz, z_all_layers
        widths = unet_widths(ngf, num_downs)
        bias = conv_bias(norm)
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            c_in = in_channels if i == 0 else widths[i - 1]
            if nz and (i == 0 or z_all_layers):
                c_in += nz
            layers = [] if i == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(c_in, w, 4, 2, 1, bias=bias))
            if 0 < i < num_downs - 1:
                layers.append(norm_layer(norm, w))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for i in range(num_downs):
            c_in = widths[i] if i == num_downs - 1 else widths[i] * 2
            c_out = out_channels if i == 0 else widths[i - 1]
            layers = [nn.ReLU(True), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias or i == 0)]
            if i == 0:
                layers.append(nn.Tanh())
            else:
                layers.append(norm_layer(norm, c_out))
                if use_dropout and 4 <= i < num_downs - 1:
                    layers.append(nn.Dropout(0.5))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x, z=None):
        if self.nz and z is None:
            raise ValueError("this U-Net takes a latent z (nz > 0): pass z of shape N×nz")
        skips, h = [], x
        for i, layer in enumerate(self.down):
            if self.nz and (i == 0 or self.z_all_layers):
                h = torch.cat([h, tile_z(z, h)], dim=1)
            h = layer(h)
            skips.append(h)
        h = self.up[-1](skips[-1])
        for i in range(self.num_downs - 2, -1, -1):
            h = self.up[i](torch.cat([h, skips[i]], dim=1))
        return h


def tile_z(z, like):
    """Broadcast N×nz latent codes to N×nz×H×W matching `like`'s spatial size."""
    return z[:, :, None, None].expand(-1, -1, like.shape[2], like.shape[3]).to(like.dtype)


class PatchDiscriminator(nn.Module):
    """70×70 PatchGAN for n_layers=3: C64-C128-C256-C512 (4×4 convs, the first three stride 2),
    LeakyReLU 0.2, no norm on the first layer, a 1-channel 4×4 conv scoring each patch."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3, norm="instance"):
        super().__init__()
        bias = conv_bias(norm)
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias),
                norm_layer(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class MultiscaleDiscriminator(nn.Module):
    """BicycleGAN's `basic_256_multi` (D_NLayersMulti): num_d PatchGANs of n_layers, scale i with
    round(ndf / 2**i) filters on the input average-pooled i times (3×3, stride 2, padding 1, padding
    not counted). Returns the list of score maps, finest first: 30×30 and 14×14 at 256² for
    n_layers=3. (The reference gives every conv a bias; ours drops it before batch norm, as
    PatchDiscriminator does; with BicycleGAN's instance norm the two are the same.)"""

    def __init__(self, in_channels=3, ndf=64, n_layers=3, norm="instance", num_d=2):
        super().__init__()
        self.n_layers = n_layers
        self.scales = nn.ModuleList(
            PatchDiscriminator(in_channels, int(round(ndf / 2**i)), n_layers, norm) for i in range(num_d)
        )
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x):
        preds = []
        for i, disc in enumerate(self.scales):
            if i:
                x = self.down(x)
            if min(x.shape[2:]) < 3 * 2**self.n_layers:  # the two stride-1 4×4 convs need 3 px left
                raise ValueError(
                    f"scale {i} of the multi-scale D sees {x.shape[2]}×{x.shape[3]} px, too small for "
                    f"n_layers={self.n_layers} (needs {3 * 2**self.n_layers}): lower n_layers_d or num_Ds"
                )
            preds.append(disc(x))
        return preds


class EncoderBlock(nn.Module):
    """BicycleGAN's E_ResNet block: norm-act-conv3×3, norm-act-conv3×3 then 2×2 mean pool, with a
    mean-pool + 1×1 conv shortcut."""

    def __init__(self, c_in, c_out, norm="instance"):
        super().__init__()
        self.body = nn.Sequential(
            norm_layer(norm, c_in),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(c_in, c_in, 3, 1, 1),
            norm_layer(norm, c_in),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(c_in, c_out, 3, 1, 1),
            nn.AvgPool2d(2, 2),
        )
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class ResnetEncoder(nn.Module):
    """BicycleGAN's E: image -> (mu, logvar) of q(z|B). A 4×4 stride-2 conv, n_blocks residual
    blocks that each halve the size, LeakyReLU, global average pool, two linear heads.
    (The reference pools a fixed 8×8 map at 256²; the global pool makes any size work.)"""

    def __init__(self, in_channels=3, nz=8, nef=64, n_blocks=4, norm="instance"):
        super().__init__()
        layers = [nn.Conv2d(in_channels, nef, 4, 2, 1)]
        c = nef
        for n in range(1, n_blocks + 1):
            c_out = nef * min(n + 1, 4)
            layers.append(EncoderBlock(c, c_out, norm))
            c = c_out
        layers += [nn.LeakyReLU(0.2, True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.mu = nn.Linear(c, nz)
        self.logvar = nn.Linear(c, nz)

    def forward(self, x):
        h = self.features(x)
        return self.mu(h), self.logvar(h)


def set_requires_grad(nets, flag):
    """Freeze or unfreeze whole nets (the G step freezes D so D takes no gradient from it)."""
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)
