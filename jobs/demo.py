"""`make demo`: a short CycleGAN training on CPU on the facades sample committed in the repo.

Ingests tests/assets/facades_small into Parquet under demo_out/data, trains a small CycleGAN
(photo a ↔ label map b) for a few minutes at most, and writes input | output | reconstruction
grids of the test images to demo_out/samples/. Everything stays local.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import MODELS  # noqa: E402
from pipeline.data import IngestOptions, LocalReader, ReadSpec, ingest  # noqa: E402
from pipeline.evaluation import save_png, translation_grid  # noqa: E402
from pipeline.loop import train_local  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--size", type=int, default=64, help="crop size fed to the nets")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--every", type=int, default=100, help="write a sample grid every N steps")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = os.path.join(args.out, "data", "facades_small")
    manifest = ingest(os.path.join(ROOT, "tests", "assets", "facades_small"), data,
                      IngestOptions(layout="aligned", load_size=args.size + args.size // 8), progress=False)
    print(f"ingested {manifest['rows']} rows into {data}")
    spec = MODELS["cyclegan"]
    cfg = spec.Config(ngf=16, ndf=16, n_blocks=3)
    train = LocalReader(ReadSpec(data, "train", batch_size=args.batch_size, crop_size=args.size, seed=0))
    test = next(iter(LocalReader(ReadSpec(data, "test", batch_size=4, load_size=args.size, flip=False))))
    samples = os.path.join(args.out, "samples")

    def write_grids(step, nets, losses):
        for direction, x in (("ab", test["a"]), ("ba", test["b"])):
            path = save_png(translation_grid(spec, cfg, nets, x, direction),
                            os.path.join(samples, f"step{step:05d}_{direction}.png"))
        cycle = losses["loss/G/cycle_a"] + losses["loss/G/cycle_b"]
        print(f"step {step:5d}  cycle {cycle:.3f}  G {losses['loss/G/total']:.3f}  "
              f"{losses['perf/images_per_s']:.1f} img/s  -> {path}", flush=True)

    start = time.time()
    _, _, _, history = train_local(spec, cfg, train, args.steps, every=args.every, on_every=write_grids)
    first = sum(h["loss/G/cycle_a"] for h in history[:10]) / 10
    last = sum(h["loss/G/cycle_a"] for h in history[-10:]) / 10
    print(f"done in {time.time() - start:.0f}s: cycle_a {first:.3f} -> {last:.3f}; grids in {samples}")


if __name__ == "__main__":
    main()
