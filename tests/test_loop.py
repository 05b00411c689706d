"""The training loop's bookkeeping: batches per step, look-ahead, loss averaging."""

import dataclasses
import os

import pytest
import torch
from runs import checkpoint_dir, tiny_run

from models import cyclegan
from pipeline import batches, loop
from pipeline import checkpoint as ckpt
from pipeline.run_config import DataSettings, TrainSettings, make_config
from pipeline.session import NullTracker
from pipeline.trainee import Progress


def losses(**values) -> dict:
    return {f"loss/{k.replace('_', '/')}": torch.tensor(v) for k, v in values.items()}


def test_meter_averages_a_loss_over_the_steps_that_reported_it():
    meter = loop.Meter()
    meter.add(losses(G_a=1.0, D_a=4.0), images=2, wait=0.0, total=1.0)
    meter.add(losses(G_a=3.0), images=2, wait=0.0, total=1.0)  # CoGAN: no D update this step
    out = meter.flush()
    assert out["loss/G/a"] == 2.0 and out["loss/D/a"] == 4.0
    assert isinstance(out["loss/G/a"], float)
    # busy time is the steps' plus the one read's (microseconds here)
    assert out["perf/step_time_s"] == pytest.approx(1.0, abs=0.05)
    assert out["perf/images_per_s"] == pytest.approx(2.0, abs=0.1)


def test_meter_names_the_first_step_with_a_non_finite_loss():
    meter = loop.Meter()
    for step, value in enumerate([1.0, float("nan"), float("inf")], start=1):
        meter.add(losses(G_a=value), images=1, wait=0.0, total=0.1, step=step)
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite losses \['loss/G/a'\]"):
        meter.read()


class Counted(torch.Tensor):
    """A loss whose every read on the host (item, tolist, float, bool) is counted: each is a
    device-to-host sync on a GPU."""

    reads = 0

    def _count(self, name, *args):
        Counted.reads += 1
        return getattr(torch.Tensor, name)(self.as_subclass(torch.Tensor), *args)

    def item(self):
        return self._count("item")

    def tolist(self):
        return self._count("tolist")

    def __float__(self):
        return self._count("__float__")

    def __bool__(self):
        return self._count("__bool__")


class Recorder(NullTracker):
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_the_loop_reads_losses_only_at_log_points_and_checkpoints(tmp_path, facades_small_dst, monkeypatch):
    """A step issues no host sync: the losses stay tensors until a log point or a checkpoint,
    where all of them are read at once (one read each)."""
    step = cyclegan.train_step
    monkeypatch.setattr(cyclegan, "train_step", lambda *args: {
        k: v.as_subclass(Counted) for k, v in step(*args).items()})
    monkeypatch.setattr(Counted, "reads", 0)
    cfg = tiny_run(tmp_path, facades_small_dst, "cyclegan", steps=6, every=3)  # log_every=2
    tracker = Recorder()
    loop.run_plain(cfg, make_tracker=lambda cfg, rank: tracker, make_evaluator=lambda *args: None)
    assert Counted.reads == len({2, 4, 6} | {3, 6})  # log points | checkpoints
    logged = [m for _, m in tracker.logged if "loss/G/total" in m]
    assert len(logged) == 3 and all(type(m["loss/G/total"]) is float for m in logged)


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint_holds_it(tmp_path, facades_small_dst,
                                                                       monkeypatch):
    """The loss goes NaN at step 2; the first read is the checkpoint at step 3 (logs every 5): it
    raises there, naming step 2, and no checkpoint is written."""
    step, calls = cyclegan.train_step, []

    def nan_at_two(*args):
        calls.append(1)
        out = step(*args)
        return {**out, "loss/G/total": out["loss/G/total"] * float("nan")} if len(calls) == 2 else out

    monkeypatch.setattr(cyclegan, "train_step", nan_at_two)
    cfg = tiny_run(tmp_path, facades_small_dst, "cyclegan", steps=6, every=3)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=5))
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite losses \['loss/G/total'\]"):
        loop.run_plain(cfg, make_evaluator=lambda *args: None)
    assert len(calls) == 3 and not os.path.exists(checkpoint_dir(cfg, 3))


class FakeBatchTensor:
    """Stands in for a CPU batch tensor on a machine without CUDA: records pinning and the copy."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def is_pinned(self):
        return False

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


@pytest.mark.parametrize("device,pinned", [("cuda", True), ("cpu", False)])
def test_batches_go_to_a_gpu_through_pinned_memory(device, pinned):
    cfg = make_config("cyclegan")
    fake = FakeBatchTensor()
    out = batches.prepare_batch(cfg, {"a": fake}, torch.device(device), channels_last=False)
    assert out["a"] is fake
    assert fake.calls == (["pin_memory"] if pinned else []) + [("to", device, True)]


@pytest.mark.parametrize("n_critic", [1, 2])
def test_the_loop_draws_batches_per_step_fresh_batches(tmp_path, facades_small_dst, monkeypatch, n_critic):
    drawn, read = [], batches.epoch_batches

    def counted(*args):
        for batch in read(*args):
            drawn.append(batch)
            yield batch

    monkeypatch.setattr(batches, "epoch_batches", counted)
    cfg = tiny_run(tmp_path, facades_small_dst, "dualgan", steps=2, every=0, n_critic=n_critic)
    final = loop.run_plain(cfg, make_evaluator=lambda *args: None)  # no evaluation: no reads beside
    meta = ckpt.read_meta(checkpoint_dir(cfg, 2))
    assert len(drawn) == 2 * n_critic and final["step"] == 2 and meta["batch"] == 2 * n_critic


def fake_stream(monkeypatch, per_epoch):
    """batch_stream over epochs of `per_epoch` numbered batches, recording the prefetched epochs."""
    prefetched = []
    monkeypatch.setattr(batches, "batches_per_epoch", lambda cfg, world: per_epoch)
    monkeypatch.setattr(batches, "epoch_batches",
                        lambda cfg, world, rank, epoch, skip: iter(range(skip, per_epoch)))

    def prefetch(make, cfg, world, rank, epoch, skip):
        prefetched.append(epoch)
        return make(cfg, world, rank, epoch, skip)

    monkeypatch.setattr(batches, "Prefetched", prefetch)
    return prefetched


@pytest.mark.parametrize("per_step,reads_next_epoch", [(1, False), (2, True)])
def test_look_ahead_counts_batches_per_step(monkeypatch, per_step, reads_next_epoch):
    """3 steps need 3 batches at one per step (one epoch of 4 holds them) but 6 at two per step:
    only then is the next epoch read ahead."""
    prefetched = fake_stream(monkeypatch, per_epoch=4)
    cfg = make_config("dualgan", data=DataSettings(reader="ray"), train=TrainSettings(steps=3))
    stream = batches.batch_stream(cfg, 1, 0, Progress(), per_step)
    drawn = [next(stream) for _ in range(3 * per_step)]
    assert (prefetched == [1]) == reads_next_epoch
    assert [(e, i) for e, i, _ in drawn][-1] == ((1, 1) if per_step == 2 else (0, 2))
    # resumed after step 1 of 3 at two per step: 4 batches left, the 2 of this epoch and 2 more
    prefetched.clear()
    resumed = batches.batch_stream(cfg, 1, 0, Progress(step=1, epoch=0, batch=2), 2)
    assert [next(resumed)[:2] for _ in range(3)] == [(0, 2), (0, 3), (1, 0)] and prefetched == [1]
    done = dataclasses.replace(cfg, train=TrainSettings(steps=2))  # 4 batches: this epoch suffices
    prefetched.clear()
    resumed = batches.batch_stream(done, 1, 0, Progress(step=1, epoch=0, batch=2), 2)
    [next(resumed) for _ in range(2)]
    assert prefetched == []


class ParamRecorder(NullTracker):
    def __init__(self):
        self.params = {}

    def log_params(self, params: dict) -> None:
        self.params.update(params)


def test_the_run_records_which_reader_auto_chose(tmp_path, facades_small_dst):
    cfg = tiny_run(tmp_path, facades_small_dst, "dualgan", steps=1, every=0, reader="auto")
    recorder = ParamRecorder()
    loop.run_plain(cfg, make_tracker=lambda cfg, rank: recorder, make_evaluator=lambda *args: None)
    assert recorder.params["data.reader_used"] == "local"  # the sample is far under AUTO_LOCAL_BYTES
    assert recorder.params["data.reader_reason"].startswith("auto: split train is ")
