"""The real datasets in ../shared/datasets: counts and content hashes as DATASETS.md states them.

The DATASETS.md hash (first 16 hex of sha256 over `relpath\\0sha256(file)\\n`, sorted) is rebuilt
from the ingested rows' source paths and sha256 column, so it also proves that no file was
dropped, duplicated or mis-hashed on the way into Parquet.
"""

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures_data import dataset_path

from pipeline import data

# From DATASETS.md.
EXPECTED = {
    "facades": {"files": {"train": 400, "test": 106}, "hash": "a2e9cc40f29b0034"},
    "weizmann_horse": {"files": {"train": 268, "val": 30, "test": 30}, "hash": "759c301dea9e0eed"},
    "mnist2mnistm": {
        "files": {"trainA": 4000, "testA": 1000, "trainB": 2000, "testB": 500},
        "hash": "dbc6bcde68124894",
    },
}


def rows_of(dst, manifest, columns=None) -> list[dict]:
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(Path(dst) / shard["path"], columns=columns).to_pylist()
    return rows


def datasets_md_hash(pairs) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(pairs):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()[:16]


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_dataset_rows_reproduce_the_published_content_hash(real_ingests, name):
    dst, manifest = real_ingests[name]
    root = dataset_path(name)
    rows = rows_of(dst, manifest, ["source", "sha256"])
    pairs = [(str(Path(r["source"]).relative_to(root)), r["sha256"]) for r in rows]
    extra = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in root.glob("labels_*.csv")]
    assert datasets_md_hash(pairs + extra) == EXPECTED[name]["hash"]
    assert manifest["rejected"] == [] and manifest["converted"] == []


@pytest.mark.integration
def test_facades_counts_and_carved_val(real_ingests):
    _, manifest = real_ingests["facades"]
    assert manifest["layout"] == "aligned"
    assert manifest["counts"] == {"train": {"ab": 360}, "val": {"ab": 40}, "test": {"ab": 106}}
    assert manifest["val_split"]["files"] == {"ab": 40}  # DATASETS.md: facades has no val split


@pytest.mark.integration
def test_weizmann_horse_keeps_its_own_val(real_ingests):
    dst, manifest = real_ingests["weizmann_horse"]
    assert manifest["counts"] == {"train": {"ab": 268}, "val": {"ab": 30}, "test": {"ab": 30}}
    assert manifest["val_split"] is None
    val = sorted(r["id"] for r in rows_of(dst, manifest, ["id", "split"]) if r["split"] == "val")
    assert val[0] == "val/val/horse269.jpg" and val[-1] == "val/val/horse298.jpg"


@pytest.mark.integration
def test_mnist2mnistm_domains_channels_and_labels(real_ingests):
    dst, manifest = real_ingests["mnist2mnistm"]
    assert manifest["layout"] == "unpaired"
    assert manifest["counts"] == {
        "train": {"a": 3600, "b": 1800},
        "val": {"a": 400, "b": 200},
        "test": {"a": 1000, "b": 500},
    }
    assert manifest["domains"] == {
        "a": {"channels": 1, "labelled": True},
        "b": {"channels": 3, "labelled": True},
    }
    rows = rows_of(dst, manifest, ["split", "domain", "label", "width", "height", "channels"])
    train_a = [r for r in rows if r["domain"] == "a" and r["split"] in ("train", "val")]
    assert np.bincount([r["label"] for r in train_a]).tolist() == [400] * 10  # DATASETS.md: 400 per class
    assert {(r["width"], r["height"], r["channels"]) for r in rows if r["domain"] == "a"} == {(28, 28, 1)}
    assert {(r["width"], r["height"], r["channels"]) for r in rows if r["domain"] == "b"} == {(32, 32, 3)}


@pytest.mark.integration
def test_digit_arrays_counts_and_labels(real_ingests):
    dst, manifest = real_ingests["digits"]
    assert manifest["layout"] == "digits"
    assert manifest["counts"] == {
        "train": {"a": 4500, "b": 6562},
        "val": {"a": 500, "b": 729},
        "test": {"b": 2007},
    }
    usps = np.load(dataset_path("digits") / "usps.npz")
    rows = {r["id"]: r["label"] for r in rows_of(dst, manifest, ["id", "label"])}
    for k in (0, 100, 2006):
        assert rows[f"test/usps.npz/x_test/{k:06d}"] == int(usps["y_test"][k])
    stored = rows_of(dst, manifest, ["domain", "width", "height"])
    sizes = {(r["domain"], r["width"], r["height"]) for r in stored}
    assert sizes == {("a", 28, 28), ("b", 22, 22)}  # USPS padded 3 px a side, as CoGAN's reference
    data.check_current(manifest, dst)
    with pytest.raises(ValueError, match="ingest again"):  # a dataset ingested before the padding
        data.check_current({k: v for k, v in manifest.items() if k != "array_padding"}, dst)
