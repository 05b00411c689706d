"""Augmentation of one stored image, and the hand-off of uint8 samples to float tensors."""

from dataclasses import dataclass

import numpy as np

from pipeline import images


@dataclass(frozen=True)
class Augment:
    """Decode + resize + crop + flip of one stored image; its randomness depends only on
    (seed, epoch, position, domain), so batching, worker count and Ray vs local cannot change it."""

    crop_size: int | None
    load_size: int | None
    flip: bool
    seed: int
    epoch: int
    channels: dict  # domain -> 1 | 3

    def sample(self, domain: str, data: bytes, position: int) -> list[np.ndarray]:
        """uint8 H x W x C arrays: [a, b] for an aligned pair, [x] otherwise."""
        pixels = images.decode(data, self.channels[domain])
        parts = (
            [pixels[:, : pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2 :]]
            if domain == "ab"
            else [pixels]
        )
        if self.load_size:
            parts = [images.resize_array(p, self.load_size) for p in parts]
        code = {"ab": 0, "a": 1, "b": 2}.get(domain, 3)
        rng = np.random.default_rng([self.seed, self.epoch, int(position), code])
        return images.crop_flip(parts, rng, self.crop_size, self.flip)


def sample_keys(domain: str) -> list[str]:
    """The batch keys of one stored domain's samples: an aligned pair gives both a and b."""
    return ["a", "b"] if domain == "ab" else [domain]


def stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}: images of different sizes {sorted(shapes)[:3]}: pass load_size (or crop_size)"
        )
    return np.stack(arrays)


def to_float(batch: dict) -> dict:
    """Images of a torch batch, uint8 N x H x W x C, -> float32 N x C x H x W in [-1, 1]; labels
    untouched. Batches travel as uint8 HWC (a quarter of float32's bytes through Ray's object
    store and to the GPU) and are converted here, on whatever device they are, in one pass."""
    import torch  # ingest and the Ray tasks that only decode never need torch

    def convert(x):
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return x.div_(127.5).sub_(1.0)

    return {k: convert(v) if v.dtype == torch.uint8 else v for k, v in batch.items()}
