"""Ray Data readers: same batches as LocalReader, deterministic per worker, inside Ray Train too."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline import data

pytestmark = pytest.mark.integration


def local_epoch(spec, **where) -> dict[str, torch.Tensor]:
    batches = list(data.LocalReader(dataclasses.replace(spec, batch_size=1000), **where))
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def ray_epoch(ds) -> dict[str, torch.Tensor]:
    batches = [data.to_float(b) for b in ds.iter_torch_batches(batch_size=1000, drop_last=False)]
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def test_raw_rows_are_the_manifest_shards(ray_cluster, facades_small_dst):
    ds = data.ray_dataset(facades_small_dst, "train", columns=["id", "index", "width"])
    rows = ds.take_all()
    assert len(rows) == 22 and {r["width"] for r in rows} == {512}
    assert sorted(r["index"] for r in rows) == list(range(22))


def test_aligned_ray_epoch_equals_local_reader_for_each_rank(ray_cluster, facades_small_dst):
    spec = data.ReadSpec(facades_small_dst, "train", crop_size=48, load_size=60, seed=11)
    for rank in (0, 1):
        got = ray_epoch(data.augmented_dataset(spec, epoch=1, world_size=2, rank=rank))
        want = local_epoch(spec, epoch=1, world_size=2, rank=rank)
        assert set(got) == {"a", "b"} and got["a"].shape == (11, 3, 48, 48)
        assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_unpaired_ray_epoch_equals_local_reader_with_labels(ray_cluster, real_ingests):
    dst, _ = real_ingests["mnist2mnistm"]
    spec = data.ReadSpec(dst, "val", crop_size=28, load_size=32, seed=4, channels=3)
    got = ray_epoch(data.augmented_dataset(spec, epoch=3))
    want = local_epoch(spec, epoch=3)
    assert set(got) == {"a", "b", "label_a", "label_b"}
    assert got["a"].shape == (400, 3, 28, 28) and got["label_b"].dtype == torch.int64
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_ray_epochs_are_repeatable_and_differ_between_epochs(ray_cluster, facades_small_dst):
    def run(epoch):
        spec = data.ReadSpec(facades_small_dst, "test", crop_size=32, load_size=40, seed=2)
        ds = data.augmented_dataset(spec, epoch=epoch)
        return ray_epoch(ds)["a"]

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_ray_train_workers_read_their_own_deterministic_shard(ray_cluster, facades_small_dst, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import ray.train

        from pipeline import data as d

        rank = ray.train.get_context().get_world_rank()
        spec = d.ReadSpec(config["dst"], "train", 4, load_size=40, crop_size=32, seed=5, drop_last=True)
        batches = d.ray_batches(spec, epoch=1)
        stacked = torch.cat([b["a"] for b in batches]).numpy()
        np.save(f"{config['out']}/rank{rank}.npy", stacked)

    trainer = TorchTrainer(
        loop,
        train_loop_config={"dst": facades_small_dst, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data_shards"),
    )
    trainer.fit()
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npy")
        spec = data.ReadSpec(facades_small_dst, "train", crop_size=32, load_size=40, seed=5)
        # 11 rows per rank, drop_last with batch 4
        want = local_epoch(spec, epoch=1, world_size=2, rank=rank)["a"][:8]
        assert got.shape == (8, 3, 32, 32)
        assert np.array_equal(got, want.numpy())


def test_training_stream_prefetches_the_next_epoch_without_changing_a_batch(ray_cluster, facades_small_dst,
                                                                             tmp_path):
    """The loop's stream over three epochs (22 samples, batch 4: 5 per epoch; the next Ray epoch is
    read ahead from mid-epoch) gives the local reader's batches in the same order."""
    from runs import tiny_run

    from pipeline.batches import batch_stream
    from pipeline.trainee import Progress

    def stream(reader, start):
        cfg = tiny_run(tmp_path, facades_small_dst, steps=13, batch_size=4, reader=reader)
        got = batch_stream(cfg, 1, 0, start)
        return [next(got) for _ in range(13 - start.step)]

    for start in (Progress(), Progress(step=3, epoch=0, batch=3)):  # fresh, and resumed mid-epoch
        ray_batches, local_batches = stream("ray", start), stream("local", start)
        assert [(e, i) for e, i, _ in ray_batches] == [(e, i) for e, i, _ in local_batches]
        assert ray_batches[-1][:2] == (2, 2)
        for (_, _, got), (_, _, want) in zip(ray_batches, local_batches, strict=True):
            assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])
