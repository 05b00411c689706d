"""`make demo`: a short CycleGAN training on CPU on the facades sample committed in the repo.

Ingests tests/assets/facades_small into Parquet under demo_out/data and trains a small CycleGAN
(photo a ↔ label map b) for a few minutes at most with the project's training loop, without Ray or
MLflow: its tracker prints the losses and writes input | output | reconstruction grids of test
images to demo_out/samples/ at each evaluation. Everything stays local.
"""

import argparse
import dataclasses
import os
import time

import torch

from pipeline import run_config as rc
from pipeline.data import IngestOptions, ingest
from pipeline.evaluation import save_png, to_rgb
from pipeline.loop import run_plain
from pipeline.session import NullTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo: its sample and demo_out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--size", type=int, default=64, help="crop size fed to the nets")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--every", type=int, default=100, help="write a sample grid every N steps")
    return p.parse_args()


class DemoTracker(NullTracker):
    """Stands in for MLflow: prints the loss windows, writes the sample grids under `out`."""

    def __init__(self, out: str):
        self.out, self.cycle = out, []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "loss/G/cycle_a" in metrics:
            self.cycle.append(metrics["loss/G/cycle_a"])
            cycle = metrics["loss/G/cycle_a"] + metrics["loss/G/cycle_b"]
            print(f"step {step:5d}  cycle {cycle:.3f}  G {metrics['loss/G/total']:.3f}  "
                  f"{metrics['perf/images_per_s']:.1f} img/s", flush=True)

    def log_image(self, image, artifact_file: str) -> None:
        path = save_png(to_rgb(image.detach().float().cpu()[None])[0], os.path.join(self.out, artifact_file))
        print(f"  -> {path}", flush=True)


def demo_config(args, data: str):
    """The demo's run: CycleGAN at 16/16 widths, 3 blocks; losses every 10 steps, evaluation and
    grids every --every steps (4 test images), one checkpoint kept; a fresh run name each time."""
    cfg = rc.make_config(
        "cyclegan", recipe="demo", data=rc.DataSettings(path=data, crop_size=args.size, reader="local"),
        train=rc.TrainSettings(steps=args.steps, batch_size=args.batch_size, log_every=10),
        eval=rc.EvalSettings(every=args.every, max_images=4, grid_rows=4, label_domain=""),
        checkpoint=rc.CheckpointSettings(every=0, keep=1),
        storage=rc.StorageSettings(path=os.path.join(args.out, "runs")),
        tracking=rc.TrackingSettings(run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}"),
        home=os.path.join(args.out, "home"))
    return rc.resolve_paths(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ngf=16, ndf=16,
                                                                             n_blocks=3)))


def main():
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = os.path.join(args.out, "data", "facades_small")
    manifest = ingest(os.path.join(ROOT, "tests", "assets", "facades_small"), data,
                      IngestOptions(layout="aligned", load_size=args.size + args.size // 8), progress=False)
    print(f"ingested {manifest['rows']} rows into {data}")
    tracker = DemoTracker(args.out)
    start = time.time()
    run_plain(demo_config(args, data), make_tracker=lambda cfg, rank: tracker)
    first, last = tracker.cycle[0], tracker.cycle[-1]
    print(f"done in {time.time() - start:.0f}s: cycle_a {first:.3f} -> {last:.3f}; "
          f"grids in {os.path.join(args.out, 'samples')}")


if __name__ == "__main__":
    main()
