"""The plain-torch core, which also runs where Ray does not (a bare GPU box, the benchmark):
`Translator` holds the net once and translates batches of decoded images; images are decoded as
ingest would and encoded with their lineage; BicycleGAN's latents are seeded per (input, sample)."""

import hashlib
import io
import json

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from models.bicyclegan import interpolation_z
from models.norms import inference_mode, run_generator
from pipeline import images
from pipeline.evaluation import to_rgb
from pipeline.generator_artifact import GeneratorArtifact

BN_MODES = ("auto", "per_image", "eval", "train")
PNG_LEVEL = 3  # zlib level: about twice as fast as pillow's default 6, for a few % more bytes


class Translator:
    """One generator, loaded once: uint8 H×W×C images in, uint8 images out.

    Inputs are resized (bicubic, as at ingest) to the model's training size and given as float
    N×C×S×S in [-1, 1]; outputs come back as uint8 N×S×S×C, or each at its input's size. On a GPU
    the net runs in channels-last layout under bf16 autocast. `bn_mode` is the inference mode
    (`mode` holds it resolved for this model); `dropout=True` keeps dropout on (pix2pix's test
    script), so outputs then vary from call to call."""

    def __init__(self, generator: GeneratorArtifact, device="cpu", bn_mode: str = "auto", bf16: bool = True,
                 dropout: bool = False):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.generator, self.bn_mode, self.size, self.dropout = generator, bn_mode, generator.size, dropout
        self.spec, self.cfg = generator.spec, generator.config
        self.mode = resolved_mode(generator, bn_mode)
        self.device = torch.device(device)
        net = generator.build(self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # one input shape all run long: autotune it once
        self.net = net.to(memory_format=torch.channels_last) if self.cuda else net
        self.nets = {generator.net_name: self.net}
        self.autocast = self.cuda and bf16
        self.in_channels, self.out_channels = generator.channels

    def to_tensor(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """uint8 H×W×C images of any sizes -> float N×C×S×S in [-1, 1] on the device."""
        x = torch.from_numpy(np.stack([images.resize_array(p, self.size) for p in pixels]))
        if self.cuda:  # uint8 crosses the bus (a quarter of float32) and is converted there
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)

    def forward(self, x: torch.Tensor | None, z: torch.Tensor | None = None) -> torch.Tensor:
        """The model's translation (CoGAN: its pair, a|b side by side) in the chosen mode. Every
        flag and batch-norm buffer is as before afterwards (train mode included)."""
        if z is not None:
            z = z.to(self.device)
        run = lambda xi, zi: self.spec.translate(self.cfg, self.nets, xi, self.generator.direction, zi)  # noqa: E731
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            y = run_generator(run, self.net, x, z, self.mode, self.dropout)
        return side_by_side(*y) if isinstance(y, tuple) else y

    @staticmethod
    def to_pixels(y: torch.Tensor) -> np.ndarray:
        """float N×C×H×W in [-1, 1] -> uint8 N×H×W×C on the CPU (converted before the copy)."""
        y = y.float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def translate(self, pixels: list[np.ndarray], z: torch.Tensor | None = None,
                  keep_size: bool = True) -> list[np.ndarray]:
        out = self.to_pixels(self.forward(self.to_tensor(pixels), z))
        if not keep_size:
            return list(out)
        return [resize_to(o, p.shape[0], p.shape[1]) for o, p in zip(out, pixels, strict=True)]

    def generate(self, z: torch.Tensor) -> list[np.ndarray]:
        """CoGAN: one a|b pair per row of z."""
        return list(self.to_pixels(self.forward(None, z)))


def resolved_mode(generator: GeneratorArtifact, bn_mode: str) -> str:
    """per_image | eval | train: `bn_mode` for this model ("auto" picks by the generator's norm)."""
    return inference_mode(generator.spec.generator_norm(generator.config), bn_mode)


def side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1] != b.shape[1]:
        a, b = to_rgb(a), to_rgb(b)
    return torch.cat([a, b], dim=3)


def resize_to(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 H×W×C -> height×width×C, bicubic (no copy when the size already fits)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    gray = pixels.shape[2] == 1
    out = np.asarray(Image.fromarray(pixels[:, :, 0] if gray else pixels).resize(
        (width, height), Image.Resampling.BICUBIC))
    return out[:, :, None] if gray else out


def decode_input(blob: bytes, channels: int) -> np.ndarray:
    """An image file as ingest would take it (images.check_image's rules: EXIF orientation,
    palettes, 16-bit, alpha, ...), decoded once when it needs none of them; raises images.Rejected."""
    img = images.open_image(blob)
    if img.mode not in ("L", "RGB") or img.getexif().get(images.EXIF_ORIENTATION, 1) not in (None, 1):
        img = images.open_image(images.check_image(blob, channels).data)
    want = "L" if channels == 1 else "RGB"
    pixels = np.asarray(img if img.mode == want else img.convert(want))
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def encode_output(pixels: np.ndarray, fmt: str, lineage: dict) -> bytes:
    """PNG (lossless) or JPEG bytes carrying their lineage: a PNG text chunk / a JPEG comment
    named "transmute" holding the lineage JSON, so a file copied elsewhere still says where it
    came from."""
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    text = json.dumps(lineage, sort_keys=True)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=images.JPEG_QUALITY, comment=("transmute:" + text).encode())
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("transmute", text)
        img.save(buf, "PNG", pnginfo=info, compress_level=PNG_LEVEL)
    return buf.getvalue()


def z_seed(seed: int, identity: str, sample: int) -> int:
    """A seed per (input, sample), stable across runs and machines (idempotent reruns); < 2**56
    so that it fits every int64 column and torch.manual_seed."""
    digest = hashlib.sha256(f"{seed}:{identity}:{sample}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def latent(nz: int, mode: str, seed: int, identity: str, sample: int, samples: int):
    """(z 1×nz, z_seed, z_t) for one output. random: z ~ N(0, I) from z_seed, the draw the served
    pyfunc model makes for params={"z_seed": z_seed}; linear: seed 001's grid, point t = k/(K-1)
    on the segment between two ends drawn from z_seed; zero: the mean output."""
    if mode == "zero":
        return torch.zeros(1, nz), None, None
    if mode == "random":
        s = z_seed(seed, identity, sample)
        return torch.randn(1, nz, generator=torch.Generator().manual_seed(s)), s, None
    s = z_seed(seed, identity, -1)
    grid = interpolation_z(nz, samples, generator=torch.Generator().manual_seed(s))
    return grid[sample:sample + 1], s, sample / max(samples - 1, 1)
