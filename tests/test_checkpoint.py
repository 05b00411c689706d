"""Checkpoints hold everything needed to continue exactly, and load without unpickling code."""

import os
import random
import shutil

import numpy as np
import pytest
import torch
from runs import checkpoint_dir, tiny_run
from safetensors.torch import load_file
from tiny import tiny_model

from models.image_pool import ImagePool
from pipeline import checkpoint as ckpt
from pipeline import storage
from pipeline.loop import run_plain
from pipeline.trainee import lr_factor


def test_rng_state_round_trip_restores_every_generator():
    ckpt.seed_everything(3)
    saved = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.seed_everything(99)
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_save_and_load_restore_nets_optimizers_pools_and_rng(tmp_path):
    spec, cfg, nets, opts = tiny_model("cyclegan")
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5) for k, o in opts.items()}
    batch = {"a": torch.rand(2, 3, 32, 32) * 2 - 1, "b": torch.rand(2, 3, 32, 32) * 2 - 1}
    state = {}
    spec.train_step(cfg, nets, opts, batch, state)
    for s in scheds.values():
        s.step()
    parts = ckpt.Parts(nets, opts, scheds, state, {"step": 1, "epoch": 0, "batch": 1})
    ckpt.save(str(tmp_path), parts, rank=0, config_json="{}")
    after = torch.rand(3)  # what the RNG gives right after the save

    _, _, nets2, opts2 = tiny_model("cyclegan")
    scheds2 = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5) for k, o in opts2.items()}
    restored = ckpt.load(str(tmp_path), rank=0, nets=nets2, optimizers=opts2, schedulers=scheds2)
    assert torch.equal(torch.rand(3), after)
    for (k, v), v2 in zip(nets.state_dict().items(), nets2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    assert opts2["G"].state_dict()["state"][0]["exp_avg"].equal(opts["G"].state_dict()["state"][0]["exp_avg"])
    assert scheds2["G"].last_epoch == 1 and restored["progress"]["step"] == 1
    pool = restored["state"]["pool_a"]
    assert isinstance(pool, ImagePool) and len(pool) == 2
    assert torch.equal(pool.images[0], state["pool_a"].images[0])
    assert restored["rank_restored"] and not ckpt.load(
        str(tmp_path), rank=1, nets=nets2, optimizers=opts2, schedulers=scheds2)["rank_restored"]


def test_checkpoint_files_load_with_weights_only_and_no_temp_files(tmp_path):
    spec, cfg, nets, opts = tiny_model("dualgan", norm="batch_renorm")
    parts = ckpt.Parts(nets, opts, {}, {"step": 0}, {"step": 0, "epoch": 0, "batch": 0})
    ckpt.save(str(tmp_path), parts, rank=0, config_json="{}")
    torch.load(tmp_path / "train.pt", weights_only=True)
    torch.load(tmp_path / "rank0.pt", weights_only=True)
    tensors = load_file(tmp_path / "nets.safetensors")
    assert any(k.endswith("rmax") for k in tensors)  # Batch Renorm limits travel with the nets
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "f.bin")
    storage.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), storage.replacing(path) as temp:
        with open(temp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_wrong_config_is_a_clear_error(tmp_path):
    _, _, nets, opts = tiny_model("cyclegan")
    parts = ckpt.Parts(nets, opts, {}, {}, {"step": 0, "epoch": 0, "batch": 0})
    ckpt.save(str(tmp_path), parts, rank=0, config_json="{}")
    _, _, other, other_opts = tiny_model("cyclegan", n_blocks=2)
    with pytest.raises(ValueError, match="does not fit these nets"):
        ckpt.load(str(tmp_path), rank=0, nets=other, optimizers=other_opts, schedulers={})


def test_lr_schedule_is_constant_then_linear_to_zero():
    assert lr_factor(0, 100, 0.5) == 1.0 and lr_factor(49, 100, 0.5) == 1.0
    assert lr_factor(75, 100, 0.5) == pytest.approx(0.5) and lr_factor(100, 100, 0.5) == 0.0
    assert lr_factor(100, 100, 1.0) == 1.0


@pytest.mark.parametrize("model,extra", [("cyclegan", {}), ("dualgan", {"norm": "batch_renorm"})])
def test_resumed_run_ends_with_the_same_weights(tmp_path, facades_small_dst, model, extra):
    """Uninterrupted 14 steps vs 7 steps + restart from the checkpoint; the restart is mid-epoch
    (about 10 batches per epoch) and crosses into the next epoch, with pools, dropout and the
    decaying learning rate all in play."""
    straight = tiny_run(tmp_path, facades_small_dst, model, name="straight", steps=14, every=7, **extra)
    run_plain(straight)
    resumed = tiny_run(tmp_path, facades_small_dst, model, name="resumed", steps=14, every=7, **extra)
    run_plain(resumed)
    shutil.rmtree(checkpoint_dir(resumed, 14))  # as if the run had died after step 7's checkpoint
    final = run_plain(resumed)  # restarts from checkpoint 7
    assert np.isfinite(final["test/psnr_ab"])  # it finished and evaluated the test split
    a = load_file(os.path.join(checkpoint_dir(straight, 14), "nets.safetensors"))
    b = load_file(os.path.join(checkpoint_dir(resumed, 14), "nets.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = ckpt.read_meta(checkpoint_dir(resumed, 14))
    assert meta["step"] == 14 and meta["epoch"] >= 1


def test_prefetched_iterator_keeps_order_and_reraises_in_the_consumer():
    from pipeline.batches import Prefetched

    assert list(Prefetched(range, 5)) == [0, 1, 2, 3, 4]
    assert list(Prefetched(iter, [])) == []

    def broken():
        raise OSError("shard 3 unreadable")

    with pytest.raises(OSError, match="shard 3"):
        list(Prefetched(broken))


def test_dualgan_steps_advance_the_data_position_by_n_critic(tmp_path, facades_small_dst):
    cfg = tiny_run(tmp_path, facades_small_dst, "dualgan", steps=2, every=1, n_critic=3)
    run_plain(cfg)
    metas = [ckpt.read_meta(checkpoint_dir(cfg, step)) for step in (1, 2)]
    assert [(m["step"], m["epoch"], m["batch"]) for m in metas] == [(1, 0, 3), (2, 0, 6)]
