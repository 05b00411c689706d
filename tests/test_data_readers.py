"""LocalReader: tensors, pairing, augmentation, determinism, worker shards, channels and labels."""

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_data import REPO
from PIL import Image

from pipeline import data


def stored_pairs(dst: str, split: str) -> dict[str, np.ndarray]:
    """sha256 of each decoded left half -> the decoded right half, straight from the shards."""
    manifest = data.read_manifest(dst)
    out = {}
    for shard in manifest["shards"]:
        if shard["split"] == split:
            for blob in pq.read_table(Path(dst) / shard["path"], columns=["image"])["image"].to_pylist():
                pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
                out[digest(pixels[:, :256])] = pixels[:, 256:]
    return out


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """C x H x W in [-1, 1] -> H x W x C uint8 (exact for values that came from uint8)."""
    return np.rint((t.numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)


def collect(reader) -> list[dict]:
    return list(reader)


def test_aligned_batches_are_left_and_right_halves_of_the_same_pair(facades_small_dst):
    pairs = stored_pairs(facades_small_dst, "train")
    reader = data.LocalReader(data.ReadSpec(facades_small_dst, "train", batch_size=5, flip=False))
    seen = []
    for batch in reader:
        assert set(batch) == {"a", "b"}
        assert batch["a"].dtype == torch.float32 and batch["a"].shape[1:] == (3, 256, 256)
        for a, b in zip(batch["a"], batch["b"], strict=True):
            key = digest(to_uint8(a))
            assert np.array_equal(to_uint8(b), pairs[key])
            seen.append(key)
    assert sorted(seen) == sorted(pairs) and len(reader) == 5  # 22 rows, batches of 5, last one short


def test_crop_and_flip_are_identical_for_a_and_b(facades_small_dst):
    plain = data.LocalReader(data.ReadSpec(facades_small_dst, "train", batch_size=22, flip=False, seed=3))
    full = next(iter(plain))
    aug = data.LocalReader(
        data.ReadSpec(facades_small_dst, "train", crop_size=240, batch_size=22, flip=True, seed=3)
    )
    batch = next(iter(aug))
    flipped = 0
    for k in range(22):
        a, b = to_uint8(batch["a"][k]), to_uint8(batch["b"][k])
        full_a, full_b = to_uint8(full["a"][k]), to_uint8(full["b"][k])
        found = find_window(a, full_a)
        assert found is not None, "crop of a is not a window of its source"
        top, left, mirror = found
        window = full_b[top : top + 240, left : left + 240]
        assert np.array_equal(b, window[:, ::-1] if mirror else window)
        flipped += mirror
    assert a.shape == (240, 240, 3)
    assert 0 < flipped < 22  # both orientations occur (fixed seed, so this cannot flake)


def find_window(crop: np.ndarray, full: np.ndarray):
    size = crop.shape[0]
    for mirror in (False, True):
        target = crop[:, ::-1] if mirror else crop
        for top in range(full.shape[0] - size + 1):
            for left in range(full.shape[1] - size + 1):
                if np.array_equal(full[top : top + size, left : left + size], target):
                    return top, left, mirror
    return None


def test_values_in_range_and_load_size_resizes(facades_small_dst):
    batch = next(
        iter(data.LocalReader(data.ReadSpec(facades_small_dst, "test", 8, load_size=72, crop_size=64)))
    )
    assert batch["a"].shape == batch["b"].shape == (8, 3, 64, 64)
    for x in (batch["a"], batch["b"]):
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5


def test_same_seed_epoch_and_workers_give_the_same_batches(facades_small_dst):
    spec = data.ReadSpec(facades_small_dst, "train", crop_size=64, load_size=80, batch_size=4, seed=7)

    def run(seed=7, epoch=2):
        reader = data.LocalReader(dataclasses.replace(spec, seed=seed), epoch=epoch)
        return torch.cat([b["a"] for b in reader])

    first = run()
    assert torch.equal(first, run())
    assert not torch.equal(first, run(epoch=3))
    assert not torch.equal(first, run(seed=8))
    reader = data.LocalReader(spec)
    reader.set_epoch(2)
    assert torch.equal(first, torch.cat([b["a"] for b in reader]))


def test_worker_shards_are_disjoint_equal_sized_and_cover_the_epoch(facades_small_dst):
    shards = []
    for rank in range(3):
        spec = data.ReadSpec(facades_small_dst, "train", batch_size=3, flip=False, seed=1)
        reader = data.LocalReader(spec, world_size=3, rank=rank)
        shards.append([digest(to_uint8(a)) for b in reader for a in b["a"]])
    assert [len(s) for s in shards] == [7, 7, 7]  # 22 rows: 22 // 3 each, equal steps for DDP
    everything = [k for s in shards for k in s]
    assert len(set(everything)) == 21


def test_rank_out_of_range_is_refused(facades_small_dst):
    reader = data.LocalReader(data.ReadSpec(facades_small_dst, "train"), world_size=2, rank=2)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        next(iter(reader))


def test_unpaired_gray_and_rgb_domains_with_labels(real_ingests):
    dst, _ = real_ingests["mnist2mnistm"]
    reader = data.LocalReader(data.ReadSpec(dst, "val", batch_size=50, seed=0, flip=False))
    batches = collect(reader)
    assert len(batches) == 8  # an epoch is max(400 a, 200 b) = 400 positions
    first = batches[0]
    assert set(first) == {"a", "b", "label_a", "label_b"}
    assert first["a"].shape == (50, 1, 28, 28) and first["b"].shape == (50, 3, 32, 32)
    assert first["label_a"].dtype == torch.int64 and first["label_a"].shape == (50,)
    a_seen = [digest(to_uint8(x)) for b in batches for x in b["a"]]
    b_seen = [digest(to_uint8(x)) for b in batches for x in b["b"]]
    assert len(set(a_seen)) == 400  # each a once
    assert len(set(b_seen)) == 200 and all(b_seen.count(k) == 2 for k in set(b_seen))  # b cycles twice


def test_unpaired_domains_are_shuffled_independently_each_epoch(real_ingests):
    dst, _ = real_ingests["mnist2mnistm"]

    def epoch(e):
        spec = data.ReadSpec(dst, "val", batch_size=400, seed=0, flip=False)
        batch = next(iter(data.LocalReader(spec, epoch=e)))
        a = [digest(to_uint8(x)) for x in batch["a"]]
        b = [digest(to_uint8(x)) for x in batch["b"]]
        return a, b

    a0, b0 = epoch(0)
    a1, b1 = epoch(1)
    assert a0 != a1 and b0 != b1  # both domains reshuffle every epoch
    pairs0, pairs1 = set(zip(a0, b0, strict=True)), set(zip(a1, b1, strict=True))
    assert len(pairs0 & pairs1) < 20  # ~400/200 = 2 expected by chance; a shared order would keep them


def test_labels_belong_to_their_images(real_ingests):
    dst, manifest = real_ingests["mnist2mnistm"]
    labels = {}
    for shard in manifest["shards"]:
        if shard["split"] == "test" and shard["domain"] == "a":
            table = pq.read_table(Path(dst) / shard["path"], columns=["image", "label"]).to_pylist()
            for row in table:
                pixels = np.asarray(Image.open(io.BytesIO(row["image"])))[:, :, None]
                labels[digest(pixels)] = row["label"]
    batch = next(iter(data.LocalReader(data.ReadSpec(dst, "test", batch_size=64, flip=False, seed=5))))
    for image, label in zip(batch["a"], batch["label_a"], strict=True):
        assert labels[digest(to_uint8(image))] == label


def test_channels_option_replicates_gray(real_ingests):
    dst, _ = real_ingests["mnist2mnistm"]
    spec = data.ReadSpec(dst, "val", batch_size=4, load_size=32, crop_size=32, channels=3)
    batch = next(iter(data.LocalReader(spec)))
    assert batch["a"].shape == batch["b"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["a"][:, 0], batch["a"][:, 2])
    with pytest.raises(ValueError, match="channels must be None"):
        data.LocalReader(data.ReadSpec(dst, "val", channels=2))


def test_digit_domains_of_different_sizes_meet_at_load_size(real_ingests):
    dst, _ = real_ingests["digits"]
    batch = next(iter(data.LocalReader(data.ReadSpec(dst, "val", load_size=32, batch_size=16))))
    assert batch["a"].shape == batch["b"].shape == (16, 1, 32, 32)
    assert set(batch) == {"a", "b", "label_a", "label_b"}
    assert batch["label_b"].min() >= 0 and batch["label_b"].max() <= 9


def test_reader_errors_name_the_problem(real_ingests, facades_small_dst):
    with pytest.raises(
        KeyError, match=r"split 'valid' not in the dataset; available: \['test', 'train', 'val'\]"
    ):
        data.LocalReader(data.ReadSpec(facades_small_dst, "valid"))
    dst, _ = real_ingests["mnist2mnistm"]
    with pytest.raises(ValueError, match="crop_size 30 is larger than the image"):
        next(iter(data.LocalReader(data.ReadSpec(dst, "val", crop_size=30))))


def test_read_spec_from_config_holds_the_runs_reader_settings(facades_small_dst, tmp_path):
    from runs import tiny_run

    cfg = tiny_run(tmp_path, facades_small_dst, batch_size=4)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=5))
    train = data.ReadSpec(facades_small_dst, "train", 4, load_size=36, crop_size=32, flip=True, seed=5,
                          drop_last=True)  # fmt: skip
    assert data.ReadSpec.from_config(cfg) == train
    # evaluation: whole images at the size the nets see (the crop), no flip, every batch kept
    evaluation = data.ReadSpec(facades_small_dst, "test", load_size=32, flip=False, seed=5)
    assert data.ReadSpec.from_config(cfg, "test", train=False) == evaluation


def test_importing_the_data_package_loads_neither_ray_nor_torch():
    """Ingest (prepare_data.py) and the Ray tasks that only decode run without Ray or torch loaded."""
    code = "import sys, pipeline.data; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


def test_auto_reader_chooses_by_the_training_split_size(facades_small_dst, monkeypatch):
    from pipeline.data import spec as spec_module

    manifest = data.read_manifest(facades_small_dst)
    assert data.choose_reader("auto", manifest, "train")[0] == "local"
    monkeypatch.setattr(spec_module, "AUTO_LOCAL_BYTES", 1024)  # the sample's train split is larger
    used, why = data.choose_reader("auto", manifest, "train")
    assert used == "ray" and why.startswith("auto: split train is ") and why.endswith(">= 0.0 MiB")
    assert data.choose_reader("local", manifest, "train") == ("local", "data.reader=local")
