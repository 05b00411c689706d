"""The training loops' bookkeeping: batches per step, look-ahead, loss averaging."""

import dataclasses

import pytest
from tiny import tiny_batch, tiny_model

from pipeline import loop
from pipeline.run_config import DataSettings, TrainSettings, make_config


def test_meter_averages_a_loss_over_the_steps_that_reported_it():
    meter = loop.Meter()
    meter.add({"loss/G/a": 1.0, "loss/D/a": 4.0}, images=2, wait=0.0, total=1.0)
    meter.add({"loss/G/a": 3.0}, images=2, wait=0.0, total=1.0)  # CoGAN: no D update this step
    out = meter.flush()
    assert out["loss/G/a"] == 2.0 and out["loss/D/a"] == 4.0
    assert out["perf/step_time_s"] == 1.0 and out["perf/images_per_s"] == 2.0


class Counted:
    """An epoch-iterable of tiny batches that counts what was drawn from it."""

    def __init__(self, cfg, n):
        self.batches, self.drawn = [tiny_batch(cfg, n=2, seed=i) for i in range(n)], 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


@pytest.mark.parametrize("n_critic", [1, 2])
def test_train_local_draws_batches_per_step_fresh_batches(n_critic):
    spec, cfg, _, _ = tiny_model("dualgan", n_critic=n_critic)
    data = Counted(cfg, 3)
    _, _, state, history = loop.train_local(spec, cfg, data, steps=2)
    assert data.drawn == 2 * n_critic and state["step"] == 2 and len(history) == 2


def fake_stream(monkeypatch, per_epoch):
    """batch_stream over epochs of `per_epoch` numbered batches, recording the prefetched epochs."""
    prefetched = []
    monkeypatch.setattr(loop, "batches_per_epoch", lambda cfg, world: per_epoch)
    monkeypatch.setattr(loop, "epoch_batches",
                        lambda cfg, world, rank, epoch, skip: iter(range(skip, per_epoch)))

    def prefetch(make, cfg, world, rank, epoch, skip):
        prefetched.append(epoch)
        return make(cfg, world, rank, epoch, skip)

    monkeypatch.setattr(loop, "Prefetched", prefetch)
    return prefetched


@pytest.mark.parametrize("per_step,reads_next_epoch", [(1, False), (2, True)])
def test_look_ahead_counts_batches_per_step(monkeypatch, per_step, reads_next_epoch):
    """3 steps need 3 batches at one per step (one epoch of 4 holds them) but 6 at two per step:
    only then is the next epoch read ahead."""
    prefetched = fake_stream(monkeypatch, per_epoch=4)
    cfg = make_config("dualgan", data=DataSettings(reader="ray"), train=TrainSettings(steps=3))
    stream = loop.batch_stream(cfg, 1, 0, loop.Progress(), per_step)
    drawn = [next(stream) for _ in range(3 * per_step)]
    assert (prefetched == [1]) == reads_next_epoch
    assert [(e, i) for e, i, _ in drawn][-1] == ((1, 1) if per_step == 2 else (0, 2))
    # resumed after step 1 of 3 at two per step: 4 batches left, the 2 of this epoch and 2 more
    prefetched.clear()
    resumed = loop.batch_stream(cfg, 1, 0, loop.Progress(step=1, epoch=0, batch=2), 2)
    assert [next(resumed)[:2] for _ in range(3)] == [(0, 2), (0, 3), (1, 0)] and prefetched == [1]
    done = dataclasses.replace(cfg, train=TrainSettings(steps=2))  # 4 batches: this epoch suffices
    prefetched.clear()
    resumed = loop.batch_stream(done, 1, 0, loop.Progress(step=1, epoch=0, batch=2), 2)
    [next(resumed) for _ in range(2)]
    assert prefetched == []
