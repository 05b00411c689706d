"""Session fixtures for the data and storage tests: a Ray instance, a SeaweedFS S3 server, the real
datasets ingested once, and a copy of the facades sample with every kind of bad file mixed in.

Wire them in tests/conftest.py with
    from fixtures_data import *  # noqa: F401,F403
(tests/ is on sys.path for its conftest, so the plain module name works).
"""

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import data

__all__ = [
    "ray_cluster",
    "s3_server",
    "s3_env",
    "facades_small_dst",
    "real_ingests",
    "bad_source",
    "bad_ingest",
]

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("TRANSMUTE_DATASETS", REPO.parent / "shared" / "datasets"))
FACADES_SMALL = REPO / "tests" / "assets" / "facades_small"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def dataset_path(name: str) -> Path:
    path = DATASETS / name
    assert path.is_dir(), f"real dataset {name} not found at {path} (set TRANSMUTE_DATASETS)"
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray for the whole session (reused if another fixture started one). Its nodes'
    environment holds the test S3 server's credentials, as a cluster node's would: the project never
    sends credentials to workers (the endpoint, which is no secret, travels with each run)."""
    import ray
    from s3server import ACCESS_KEY, SECRET_KEY

    started = not ray.is_initialized()
    if started:
        node_env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        before = {k: os.environ.get(k) for k in node_env}
        os.environ.update(node_env)  # the raylet, and so every worker, inherits this environment
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 with one identity (see tests/s3server.py)."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Credentials and endpoint only through the AWS environment, isolated from ~/.aws."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def facades_small_dst(tmp_path_factory) -> str:
    """tests/assets/facades_small ingested with small shards (several per split)."""
    dst = str(tmp_path_factory.mktemp("facades_small"))
    data.ingest(str(FACADES_SMALL), dst, data.IngestOptions(shard_rows=8), progress=False)
    return dst


@pytest.fixture(scope="session")
def real_ingests(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """facades, weizmann_horse, mnist2mnistm and digits from ../shared/datasets, ingested once."""
    out = {}
    for name in ("facades", "weizmann_horse", "mnist2mnistm", "digits"):
        dst = str(tmp_path_factory.mktemp(f"real_{name}"))
        out[name] = (dst, data.ingest(str(dataset_path(name)), dst, progress=False))
    return out


# ----------------------------------------------------------------------------- bad inputs


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid gray PNG of width x height zeros: a few hundred KB that decode to width*height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files(good: Image.Image) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected outcome: "rejected" or the conversion the manifest must name)."""
    good_bytes = _jpeg(good)
    rgba = good.convert("RGBA")
    holed = rgba.copy()
    holed.putpixel((3, 3), (0, 0, 0, 0))
    sixteen = Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257)
    rotated = good.transpose(Image.Transpose.ROTATE_90)  # stored 256x512, EXIF says rotate back
    exif = rotated.getexif()
    exif[0x0112] = 6
    return {
        "truncated.jpg": (good_bytes[: len(good_bytes) // 2], "rejected"),
        "empty.jpg": (b"", "rejected"),
        "not_an_image.png": (b"<html>this is not an image</html>\n" * 20, "rejected"),
        "cmyk.jpg": (_jpeg(good.convert("CMYK")), "converted CMYK to RGB"),
        "rgba_opaque.png": (_png(rgba), "dropped fully opaque alpha"),
        "rgba_transparent.png": (_png(holed), "rejected"),
        "palette.png": (_png(good.convert("P")), "expanded palette"),
        "sixteen_bit.png": (_png(sixteen), "scaled 16-bit to 8-bit"),
        "gray.jpg": (_jpeg(good.convert("L")), "converted grayscale to RGB"),
        "exif_rotated.jpg": (_jpeg(rotated, exif=exif), "applied EXIF orientation 6"),
        "too_narrow.jpg": (_jpeg(good.crop((0, 0, 300, 256))), "rejected"),
        "bomb.png": (png_bomb(12000, 12000), "rejected"),
    }


@pytest.fixture(scope="session")
def bad_source(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of facades_small with each kind of bad file added to train/."""
    root = tmp_path_factory.mktemp("bad_source") / "facades_bad"
    shutil.copytree(FACADES_SMALL, root)
    good = Image.open(FACADES_SMALL / "train" / "1.jpg").convert("RGB")
    expected = bad_files(good)
    for name, (blob, _) in expected.items():
        (root / "train" / name).write_bytes(blob)
    return root, expected


@pytest.fixture(scope="session")
def bad_ingest(bad_source, tmp_path_factory) -> tuple[str, dict]:
    dst = str(tmp_path_factory.mktemp("bad_ingest"))
    return dst, data.ingest(str(bad_source[0]), dst, progress=False)
