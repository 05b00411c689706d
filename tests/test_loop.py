"""The training loop's bookkeeping: batches per step, look-ahead, loss averaging."""

import dataclasses

import pytest
from runs import checkpoint_dir, tiny_run

from pipeline import batches, loop
from pipeline import checkpoint as ckpt
from pipeline.run_config import DataSettings, TrainSettings, make_config
from pipeline.session import NullTracker
from pipeline.trainee import Progress


def test_meter_averages_a_loss_over_the_steps_that_reported_it():
    meter = loop.Meter()
    meter.add({"loss/G/a": 1.0, "loss/D/a": 4.0}, images=2, wait=0.0, total=1.0)
    meter.add({"loss/G/a": 3.0}, images=2, wait=0.0, total=1.0)  # CoGAN: no D update this step
    out = meter.flush()
    assert out["loss/G/a"] == 2.0 and out["loss/D/a"] == 4.0
    assert out["perf/step_time_s"] == 1.0 and out["perf/images_per_s"] == 2.0


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
