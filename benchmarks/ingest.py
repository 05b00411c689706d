"""Ingest and reader throughput on facades, beside a plain folder-of-JPEGs torch DataLoader.

    python -m benchmarks.ingest [--src ../shared/datasets/facades] [--ray]

Prints:
- ingest images/s, as stored (bytes kept) and with --load-size (resized and re-encoded once);
- reader pairs/s per core for the same augmentation (resize to load size, random 256 crop shared
  by A and B, horizontal flip, float32 in [-1, 1]): the folder DataLoader, LocalReader over the
  resized ingest, and LocalReader over the unresized ingest (resizing at read time, to show where
  the gain comes from); optionally Ray Data (`augmented_dataset`) per core of its CPUs.
Every reader runs single-process with one torch thread, so "per core" is what one core does.
A pair is one A|B sample (two 256x256 images).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import data

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "facades"


class FolderPairs(torch.utils.data.Dataset):
    """The usual pix2pix loader: open a JPEG, split A|B, resize, shared random crop and flip."""

    def __init__(self, folder: Path, load_size: int, crop_size: int, seed: int = 0):
        self.paths = sorted(folder.glob("*.jpg"))
        self.load_size, self.crop_size = load_size, crop_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> dict:
        img = Image.open(self.paths[k]).convert("RGB")
        half = img.width // 2
        size = (self.load_size, self.load_size)
        a = img.crop((0, 0, half, img.height)).resize(size, Image.Resampling.BICUBIC)
        b = img.crop((half, 0, img.width, img.height)).resize(size, Image.Resampling.BICUBIC)
        top, left = self.rng.integers(0, self.load_size - self.crop_size + 1, size=2)
        flip = self.rng.random() < 0.5
        return {"a": self._tensor(a, top, left, flip), "b": self._tensor(b, top, left, flip)}

    def _tensor(self, img: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        pixels = np.asarray(img)[top : top + self.crop_size, left : left + self.crop_size]
        if flip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(127.5).sub(1)


def pairs_per_s(batches, repeats: int) -> float:
    """Best of `repeats` full passes (the first also warms the page cache)."""
    best = 0.0
    for _ in range(repeats):
        start, count = time.perf_counter(), 0
        for batch in batches():
            count += len(batch["a"])
        best = max(best, count / (time.perf_counter() - start))
    return best


def timed_ingest(src: Path, dst: str, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = data.ingest(str(src), dst, data.IngestOptions(**kw), progress=False)
    elapsed = time.perf_counter() - start
    return manifest["rows"] / elapsed, manifest


def ray_pairs_per_s(dst: str, split: str, crop_size: int, cpus: int, repeats: int) -> float:
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    try:

        def batches():
            ds = data.augmented_dataset(data.ReadSpec(dst, split, crop_size=crop_size, seed=0))
            return ds.iter_torch_batches(batch_size=16)

        return pairs_per_s(batches, repeats) / cpus
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--load-size", type=int, default=286)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="ingest threads")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data reader")
    args = p.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count()
    print(f"facades at {args.src}; {cores} cores; load {args.load_size}, crop {args.crop_size}")

    with tempfile.TemporaryDirectory() as tmp:
        raw, resized = f"{tmp}/raw", f"{tmp}/resized"
        ingest_raw, manifest = timed_ingest(args.src, raw, workers=args.workers)
        ingest_resized, _ = timed_ingest(args.src, resized, workers=args.workers, load_size=args.load_size)
        split, n = "train", manifest["counts"]["train"]["ab"]
        threads = f"({args.workers} threads, {cores} cores)"
        print(f"ingest, bytes kept      : {ingest_raw:7.1f} images/s {threads}")
        print(f"ingest, resized once    : {ingest_resized:7.1f} images/s {threads}")

        folder = FolderPairs(args.src / "train", args.load_size, args.crop_size)
        loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=0)
        baseline = pairs_per_s(lambda: iter(loader), args.repeats)

        def reader(dst, load_size=None):
            spec = data.ReadSpec(
                dst, split, args.batch_size, load_size, args.crop_size, flip=True, seed=0
            )
            return lambda: data.LocalReader(spec)

        parquet = pairs_per_s(reader(resized), args.repeats)
        parquet_raw = pairs_per_s(reader(raw, args.load_size), args.repeats)
        print(f"reader, folder DataLoader: {baseline:7.1f} pairs/s per core ({len(folder)} files)")
        print(f"reader, Parquet resized  : {parquet:7.1f} pairs/s per core ({n} rows of split {split})")
        print(f"reader, Parquet raw      : {parquet_raw:7.1f} pairs/s per core (resizing at read time)")
        print(f"ratio Parquet/folder     : {parquet / baseline:7.2f}x (goal >= 1.5x)")
        print(f"ratio raw Parquet/folder : {parquet_raw / baseline:7.2f}x")
        if args.ray:
            ray_rate = ray_pairs_per_s(resized, split, args.crop_size, cores, args.repeats)
            note = f"({cores} CPUs, Ray's per-epoch overhead included)"
            print(f"reader, Ray Data resized : {ray_rate:7.1f} pairs/s per core {note}")


if __name__ == "__main__":
    main()
