"""Ingest: layouts, manifest, bad inputs, strict mode, atomic and idempotent writes, CLI errors."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures_data import FACADES_SMALL, REPO, dataset_path

from pipeline import data

CLI = [sys.executable, str(REPO / "jobs" / "prepare_data.py")]


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def parquet_files(dst) -> list[str]:
    return sorted(str(p.relative_to(dst)) for p in Path(dst).rglob("*.parquet") if not p.name.startswith("."))


def all_rows(dst, manifest) -> list[dict]:
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(Path(dst) / shard["path"]).to_pylist()
    return rows


# ----------------------------------------------------------------------------- bad inputs


def test_bad_files_rejected_or_converted_and_good_neighbours_kept(bad_source, bad_ingest):
    root, expected = bad_source
    dst, manifest = bad_ingest
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    converted = {c["path"]: c["changes"] for c in manifest["converted"]}
    for name, (_, outcome) in expected.items():
        path = f"train/{name}"
        if outcome == "rejected":
            assert rejected.get(path), f"{name} should be rejected with a reason"
        else:
            assert outcome in converted.get(path, []), (
                f"{name}: expected {outcome!r}, got {converted.get(path)}"
            )
    rows = {r["source"]: r for r in all_rows(dst, manifest)}
    originals = sorted(p for p in root.rglob("*.jpg") if p.name[0].isdigit())
    assert len(originals) == 32
    for path in originals:  # every good file, byte for byte, with its own sha256
        row = rows[str(path)]
        assert row["image"] == path.read_bytes()
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    n_converted = sum(outcome != "rejected" for _, outcome in expected.values())
    assert manifest["rows"] == len(rows) == 32 + n_converted


def test_strict_fails_with_the_list_and_publishes_nothing(bad_source, tmp_path):
    root, expected = bad_source
    result = run_cli(root, tmp_path / "out", "--strict", "--no-progress")
    assert result.returncode == 4, result.stderr  # its own code: 1 is a crash
    for name, (_, outcome) in expected.items():
        if outcome == "rejected":
            assert f"train/{name}" in result.stderr
    assert not (tmp_path / "out" / data.MANIFEST).exists()
    assert parquet_files(tmp_path / "out") == []


def test_strict_passes_on_clean_data(tmp_path):
    result = run_cli(FACADES_SMALL, tmp_path / "out", "--strict", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert data.read_manifest(str(tmp_path / "out"))["rejected"] == []


# ----------------------------------------------------------------------------- manifest and rows


def test_manifest_describes_the_dataset(facades_small_dst):
    manifest = data.read_manifest(facades_small_dst)
    assert manifest["schema_version"] == data.SCHEMA_VERSION and manifest["layout"] == "aligned"
    assert manifest["counts"] == {"train": {"ab": 22}, "val": {"ab": 2}, "test": {"ab": 8}}
    assert manifest["val_split"]["from"] == "train" and manifest["val_split"]["files"] == {"ab": 2}
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] == 32
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) == 3  # shard_rows=8
    assert parquet_files(facades_small_dst) == sorted(s["path"] for s in manifest["shards"])
    for shard in manifest["shards"]:
        blob = (Path(facades_small_dst) / shard["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == shard["sha256"] and len(blob) == shard["bytes"]


def test_rows_have_the_schema_and_unique_ids(facades_small_dst):
    manifest = data.read_manifest(facades_small_dst)
    rows = all_rows(facades_small_dst, manifest)
    assert pq.read_schema(Path(facades_small_dst) / manifest["shards"][0]["path"]).names == data.SCHEMA.names
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) == 32
    for row in rows:
        assert row["id"] == f"{row['split']}/{Path(row['source']).relative_to(FACADES_SMALL)}"
        assert (row["width"], row["height"], row["channels"], row["domain"]) == (512, 256, 3, "ab")
        assert row["label"] is None
    for split, count in manifest["counts"].items():
        assert sorted(r["index"] for r in rows if r["split"] == split) == list(range(count["ab"]))
    val = sorted(r["id"] for r in rows if r["split"] == "val")
    assert all(v.startswith("val/train/") for v in val)  # carved from train, source path kept


def test_shards_are_also_cut_by_bytes(tmp_path):
    options = data.IngestOptions(shard_bytes=150_000)
    manifest = data.ingest(str(FACADES_SMALL), str(tmp_path), options, progress=False)
    assert sum(s["rows"] for s in manifest["shards"]) == 32 and len(manifest["shards"]) >= 11
    for shard in manifest["shards"]:
        images = pq.read_table(tmp_path / shard["path"], columns=["image"])["image"].to_pylist()
        assert sum(map(len, images)) <= 150_000


def test_content_hash_is_sha256_over_sorted_id_tab_sha_lines(facades_small_dst):
    manifest = data.read_manifest(facades_small_dst)
    lines = sorted(f"{r['id']}\t{r['sha256']}\n" for r in all_rows(facades_small_dst, manifest))
    assert manifest["content_hash"] == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_load_size_resizes_at_ingest_and_reencodes(tmp_path):
    options = data.IngestOptions(load_size=64)
    manifest = data.ingest(str(FACADES_SMALL), str(tmp_path), options, progress=False)
    rows = all_rows(tmp_path, manifest)
    assert manifest["load_size"] == 64
    assert {(r["width"], r["height"], r["format"]) for r in rows} == {(128, 64, "jpeg")}
    assert manifest["content_hash"] == data.content_hash((r["id"], r["sha256"]) for r in rows)


def test_unpaired_labels_from_csv(tmp_path):
    src = tmp_path / "src"
    for folder, names in {
        "trainA": ["x1.png", "x2.png"],
        "trainB": ["y1.png"],
        "testA": ["t.png"],
        "testB": ["u.png"],
    }.items():
        (src / folder).mkdir(parents=True)
        for k, name in enumerate(names):
            from PIL import Image

            Image.new("L" if folder.endswith("A") else "RGB", (8, 8), k * 40).save(src / folder / name)
    (src / "labels_trainA.csv").write_text("filename,label\nx1.png,3\nx2.png,7\n")
    (src / "trainB" / "labels.csv").write_text("filename,label\ny1.png,5\n")
    no_val = data.IngestOptions(val_fraction=0)
    manifest = data.ingest(str(src), str(tmp_path / "out"), no_val, progress=False)
    assert manifest["layout"] == "unpaired"
    assert manifest["domains"] == {
        "a": {"channels": 1, "labelled": False},
        "b": {"channels": 3, "labelled": False},
    }
    rows = {r["id"]: r["label"] for r in all_rows(tmp_path / "out", manifest)}
    assert rows["train/trainA/x1.png"] == 3 and rows["train/trainA/x2.png"] == 7
    assert rows["train/trainB/y1.png"] == 5 and rows["test/testA/t.png"] is None
    assert manifest["ignored"] == []  # label files are inputs, not strays


def test_bad_label_csv_names_file_and_line(tmp_path):
    for folder in ("trainA", "trainB"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(b"")
    (tmp_path / "labels_trainA.csv").write_text("filename,label\na.png,1\nb.png,seven\n")
    with pytest.raises(data.IngestError, match=r"labels_trainA.csv line 3: label 'seven'"):
        data.ingest(str(tmp_path), str(tmp_path / "out"), progress=False)


def test_digit_arrays_with_wrong_dtype_are_a_clear_error(tmp_path):
    np.savez(tmp_path / "digits.npz", x=np.zeros((3, 8, 8), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(
        data.IngestError, match=r"digits.npz\['x'\]: expected uint8 .* got float32 \(3, 8, 8\)"
    ):
        data.ingest(str(tmp_path / "digits.npz"), str(tmp_path / "out"), progress=False)


def test_single_npz_file_is_one_labelled_domain(tmp_path):
    pixels = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)  # the minimum side
    np.savez(
        tmp_path / "tiny.npz", x_train=pixels, y_train=np.arange(5), x_test=pixels[:2], y_test=np.arange(2)
    )
    no_val = data.IngestOptions(val_fraction=0)
    manifest = data.ingest(str(tmp_path / "tiny.npz"), str(tmp_path / "out"), no_val, progress=False)
    assert manifest["layout"] == "digits" and manifest["counts"] == {"test": {"a": 2}, "train": {"a": 5}}
    rows = sorted(all_rows(tmp_path / "out", manifest), key=lambda r: r["id"])
    assert rows[-1]["id"] == "train/tiny.npz/x_train/000004" and rows[-1]["label"] == 4
    assert rows[-1]["sha256"] == hashlib.sha256(pixels[4].tobytes()).hexdigest()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_source_is_a_clear_error(tmp_path, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    result = run_cli(src, tmp_path / "out")
    assert result.returncode == 2
    assert f"source {src} is empty or does not exist" in result.stderr


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(data.IngestError, match="unknown layout 'pix2pix'"):
        data.ingest(str(FACADES_SMALL), str(tmp_path), data.IngestOptions(layout="pix2pix"), progress=False)
    result = run_cli(FACADES_SMALL, tmp_path, "--layout", "pix2pix")
    assert result.returncode == 2 and "invalid choice: 'pix2pix'" in result.stderr


def test_undetectable_layout_lists_what_it_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_bytes((FACADES_SMALL / "train" / "1.jpg").read_bytes())
    with pytest.raises(data.IngestError, match=r"cannot detect the layout.*\['photos'\]"):
        data.ingest(str(tmp_path), str(tmp_path / "out"), progress=False)


def test_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(
        data.IngestError, match=r"\['valid'\] not in the source; available: \['test', 'train', 'val'\]"
    ):
        data.ingest(str(FACADES_SMALL), str(tmp_path), data.IngestOptions(splits=["valid"]), progress=False)


def test_split_option_and_auto_layout_report(tmp_path):
    result = run_cli(FACADES_SMALL, tmp_path / "out", "--split", "test")
    assert result.returncode == 0, result.stderr
    assert "layout aligned (found split folders ['test', 'train'])" in result.stdout
    assert "rejects=0" in result.stderr and "file/s" in result.stderr  # the progress bar
    manifest = data.read_manifest(str(tmp_path / "out"))
    assert manifest["counts"] == {"test": {"ab": 8}}
    assert (
        manifest["command"].startswith("python jobs/prepare_data.py ")
        and "--split test" in manifest["command"]
    )


def test_reading_a_folder_without_manifest_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest did not finish"):
        data.read_manifest(str(tmp_path))


# ----------------------------------------------------------------------------- atomic and idempotent


def test_rerun_is_idempotent_and_removes_stale_shards(tmp_path):
    dst = str(tmp_path / "out")
    first = data.ingest(str(FACADES_SMALL), dst, data.IngestOptions(shard_rows=5), progress=False)
    files = {p: (Path(dst) / p).read_bytes() for p in parquet_files(dst)}
    second = data.ingest(str(FACADES_SMALL), dst, data.IngestOptions(shard_rows=5), progress=False)
    assert second == first
    assert {p: (Path(dst) / p).read_bytes() for p in parquet_files(dst)} == files
    third = data.ingest(str(FACADES_SMALL), dst, data.IngestOptions(shard_rows=100), progress=False)
    assert third["content_hash"] == first["content_hash"]
    assert parquet_files(dst) == sorted(s["path"] for s in third["shards"]) and len(third["shards"]) == 3
    ids = [r["id"] for r in all_rows(dst, third)]
    assert len(ids) == len(set(ids)) == 32


def test_interrupted_ingest_leaves_nothing_a_reader_takes_and_rerun_completes(tmp_path, real_ingests):
    src, dst = dataset_path("facades"), tmp_path / "out"
    args = [
        *CLI,
        str(src),
        str(dst),
        "--shard-rows",
        "4",
        "--workers",
        "1",
        "--load-size",
        "300",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    deadline = time.monotonic() + 120
    while len(parquet_files(dst)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "ingest finished before it could be interrupted"
    assert not (dst / data.MANIFEST).exists()
    with pytest.raises(FileNotFoundError):
        data.read_manifest(str(dst))
    for rel in parquet_files(dst):  # whatever has a final name is a complete file
        assert 0 < pq.read_metadata(dst / rel).num_rows <= 4
    result = run_cli(src, dst, "--shard-rows", "4", "--load-size", "300", "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = data.read_manifest(str(dst))
    assert manifest["content_hash"] == real_ingests["facades"][1]["content_hash"]
    left = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert left == sorted([data.MANIFEST, *(s["path"] for s in manifest["shards"])])  # no temp files either
