"""Storage and ingest against a real S3-compatible server (SeaweedFS `weed mini` on 127.0.0.1).

Credentials reach the code only through the AWS environment (fixture s3_env); every test that
can produce output checks that the secret is not in it.
"""

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures_data import FACADES_SMALL, REPO
from s3server import S3Server

from pipeline import data, storage

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_env, request) -> str:
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    return s3_env.make_bucket(name)


def assert_no_secret(*texts: str, secret: str) -> None:
    for text in texts:
        assert secret not in text


def test_write_read_list_remove(bucket, s3_env):
    storage.write_bytes(f"{bucket}/dir/a.bin", b"alpha")
    storage.write_bytes(f"{bucket}/dir/sub/b.bin", b"beta")
    storage.write_bytes(f"{bucket}/other.bin", b"x")
    assert storage.read_bytes(f"{bucket}/dir/a.bin") == b"alpha"
    assert storage.list_files(f"{bucket}/dir") == ["a.bin", "sub/b.bin"]
    assert storage.is_file(f"{bucket}/dir/a.bin") and not storage.is_file(f"{bucket}/dir")
    assert storage.exists(f"{bucket}/dir") and not storage.exists(f"{bucket}/nothing")
    storage.remove(f"{bucket}/dir/a.bin")
    assert storage.list_files(f"{bucket}/dir") == ["sub/b.bin"]
    storage.remove(f"{bucket}/dir")
    assert storage.list_files(f"{bucket}/dir") == [] and storage.list_files(bucket) == ["other.bin"]


def test_ingest_to_s3_and_read_back_locally_and_with_ray(
    bucket, s3_env, facades_small_dst, ray_cluster, caplog, capfd
):
    dst = f"{bucket}/facades"
    with caplog.at_level(logging.DEBUG):
        manifest = data.ingest(str(FACADES_SMALL), dst, data.IngestOptions(shard_rows=8), progress=True)
    local = data.read_manifest(facades_small_dst)
    assert manifest["content_hash"] == local["content_hash"] and manifest["counts"] == local["counts"]
    listed = storage.list_files(dst)
    assert listed == sorted([data.MANIFEST, *(s["path"] for s in manifest["shards"])])
    spec = data.ReadSpec(dst, "train", 100, load_size=72, crop_size=64, seed=3)
    from_s3 = next(iter(data.LocalReader(spec, world_size=2, rank=1)))
    on_disk = dataclasses.replace(spec, data_path=facades_small_dst)
    from_disk = next(iter(data.LocalReader(on_disk, world_size=2, rank=1)))
    assert torch.equal(from_s3["a"], from_disk["a"]) and torch.equal(from_s3["b"], from_disk["b"])
    rows = data.augmented_dataset(spec, world_size=2, rank=1).take_all()
    first = data.to_float({"a": torch.tensor(rows[0]["a"])[None]})["a"]  # rows are uint8 H x W x C
    assert rows[0]["a"].shape == (64, 64, 3) and torch.equal(first, from_disk["a"][:1])
    out, err = capfd.readouterr()
    shard_bytes = b"".join(storage.read_bytes(f"{dst}/{s['path']}") for s in manifest["shards"])
    assert s3_env.secret_key.encode() not in shard_bytes
    assert_no_secret(str(manifest), caplog.text, out, err, ray_logs(), secret=s3_env.secret_key)
    storage.remove(dst)
    assert storage.list_files(bucket) == []


def ray_logs() -> str:
    logs = Path("/tmp/ray/session_latest/logs")
    return "".join(
        p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 5e6
    )


def test_ingest_from_s3_source(bucket, s3_env, facades_small_dst, tmp_path):
    for path in FACADES_SMALL.rglob("*.jpg"):
        storage.write_bytes(f"{bucket}/src/{path.relative_to(FACADES_SMALL)}", path.read_bytes())
    manifest = data.ingest(f"{bucket}/src", str(tmp_path), progress=False)
    assert manifest["content_hash"] == data.read_manifest(facades_small_dst)["content_hash"]
    assert manifest["source"] == f"{bucket}/src"
    row = pq.read_table(tmp_path / manifest["shards"][0]["path"]).to_pylist()[0]
    assert row["source"].startswith(f"{bucket}/src/")


def test_cli_with_explicit_endpoint(bucket, s3_env, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    args = [
        sys.executable,
        str(REPO / "jobs" / "prepare_data.py"),
        str(FACADES_SMALL),
        f"{bucket}/cli",
        "--s3-endpoint",
        s3_env.endpoint,
        "--split",
        "test",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert data.read_manifest(f"{bucket}/cli")["counts"] == {"test": {"ab": 8}}
    assert_no_secret(result.stdout, result.stderr, secret=s3_env.secret_key)


def test_wrong_credentials_fail_clearly_and_quickly(bucket, s3_env, monkeypatch, tmp_path):
    wrong = "not-the-right-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        data.ingest(str(FACADES_SMALL), f"{bucket}/x", progress=False)
    message = str(info.value)
    assert time.monotonic() - start < 30
    assert s3_env.endpoint in message and bucket in message and "wrong credentials" in message
    assert "AWS_SECRET_ACCESS_KEY" in message  # says what to check
    assert_no_secret(message, secret=wrong)
    assert_no_secret(message, secret=s3_env.secret_key)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "prepare_data.py"),
            str(FACADES_SMALL),
            f"{bucket}/x",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3 and s3_env.endpoint in result.stderr
    assert_no_secret(result.stdout, result.stderr, secret=wrong)
    with pytest.raises(storage.StorageError, match="SignatureDoesNotMatch"):  # a GET names the cause
        storage.list_files(bucket)


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(
        storage.StorageError, match=r"s3://no-such-bucket-here/x/_manifest.json .*NoSuchBucket|404"
    ):
        storage.read_bytes("s3://no-such-bucket-here/x/_manifest.json")


def test_stopped_server_fails_after_bounded_retries(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "weed").start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    uri = server.make_bucket("stopping") + "/a.bin"
    storage.write_bytes(uri, b"kept")
    assert storage.read_bytes(uri) == b"kept"
    server.stop()
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(uri)
    assert time.monotonic() - start < 30
    assert server.endpoint in str(info.value) and "cannot connect after 3 attempts" in str(info.value)
    with pytest.raises(storage.StorageError, match="is the server running"):
        data.read_manifest("s3://stopping/dataset")
