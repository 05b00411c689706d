"""A short real-data run: CycleGAN on the facades sample committed in the repo."""

import dataclasses
import os

import torch
from runs import checkpoint_dir, tiny_run

from models import MODELS
from pipeline import checkpoint as ckpt
from pipeline.data import IngestOptions, LocalReader, ReadSpec, ingest
from pipeline.evaluation import save_png, translation_grid
from pipeline.loop import run_plain
from pipeline.session import NullTracker

SAMPLE = os.path.join(os.path.dirname(__file__), "assets", "facades_small")


class LossRecorder(NullTracker):
    """A tracker that keeps the loop's logged loss windows."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "loss/G/cycle_a" in metrics:
            self.rows.append(metrics)


def test_cyclegan_lowers_cycle_loss_on_real_facades(tmp_path):
    data = str(tmp_path / "facades_small")
    ingest(SAMPLE, data, IngestOptions(layout="aligned", load_size=36), progress=False)
    cfg = tiny_run(tmp_path, data, "cyclegan", steps=100, every=0, batch_size=4, ngf=8, ndf=8, n_blocks=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=10))  # 10-step means
    recorder = LossRecorder()
    final = run_plain(cfg, make_tracker=lambda cfg, rank: recorder, make_evaluator=lambda *args: None)
    cycle = [row["loss/G/cycle_a"] + row["loss/G/cycle_b"] for row in recorder.rows]
    first, last = cycle[0], cycle[-1]  # the mean of the first ten steps, and of the last ten
    print("cycle", first, last)
    assert last < 0.85 * first, (first, last)
    assert final["step"] == 100 and len(cycle) == 10

    spec = MODELS["cyclegan"]
    nets = spec.build_nets(cfg.model)
    ckpt.load_nets(checkpoint_dir(cfg, 100), nets)
    test = next(iter(LocalReader(ReadSpec(data, "test", 3, load_size=32, flip=False))))
    grid = translation_grid(spec, cfg.model, nets, test["a"], "ab")
    assert grid.shape == (3, 3 * 34 + 2, 3 * 34 + 2)  # 3 rows; input | output | reconstruction
    assert all(m.training for m in nets.modules())  # the grid restored train mode
    path = save_png(grid, str(tmp_path / "grid.png"))
    assert os.path.getsize(path) > 0 and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_eval_mode_differs_from_train_mode_with_batch_norm_only():
    """Seed 000: batch-norm generators sample differently in train and eval mode; instance
    norm does not (dropout is off here so that only the norm can make the difference)."""
    spec = MODELS["dualgan"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    gaps = {}
    for norm in ("batch", "instance"):
        torch.manual_seed(0)
        cfg = spec.Config(ngf=4, ndf=4, num_downs=5, norm=norm, use_dropout=False)
        nets = spec.build_nets(cfg)
        train_out = translation_grid(spec, cfg, nets, x, "ab", mode="train")
        eval_out = translation_grid(spec, cfg, nets, x, "ab", mode="eval")
        gaps[norm] = (train_out - eval_out).abs().mean().item()
    assert gaps["batch"] > 1e-3 and gaps["instance"] < 1e-6, gaps
