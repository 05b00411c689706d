"""The on-disk format of an ingested dataset: row schema, shard names and the manifest that lists them.

Readers only take the shards the manifest lists, so an interrupted ingest (which leaves at most
hidden temp files and complete but unlisted shards) is never read as a dataset.
"""

import hashlib
import json
import re

import pyarrow as pa

from pipeline import storage

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
SHARD_NAME = re.compile(r"^[^/]+/[^/]+/part-\d{5}-[0-9a-f]{16}\.parquet$")
TEMP_NAME = re.compile(r"(^|/)\.[^/]*" + re.escape(storage.TEMP_MARK) + r"[0-9a-f]{8}$")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("domain", pa.string()),
        ("index", pa.int64()),
        ("image", pa.binary()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int8()),
        ("label", pa.int64()),
        ("source", pa.string()),
        ("sha256", pa.string()),
    ]
)

# USPS digits fill their 16×16 frame; MNIST's sit in a 28×28 frame with a 4-pixel margin. Read at
# one size, the two domains would show digits at different scales, which no shared generator layer
# can couple (CoGAN's pairs then disagree). The CoGAN reference pads USPS by 3 px on each side before
# resizing to 28 (mingyuliutw/CoGAN cogan/data/compute_optimal_alignment.py: "the optimal padding
# size is 3"); we do the same at ingest, with USPS's background value 0. It lives here because a
# digits manifest records it and `check_current` refuses a dataset made without it.
ARRAY_PADDING = {"usps.npz": 3}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_hash(pairs) -> str:
    """sha256 over the sorted lines `id<TAB>sha256`, each ending in a newline."""
    lines = sorted(f"{row_id}\t{digest}\n" for row_id, digest in pairs)
    return sha256("".join(lines).encode())


def read_manifest(data_path: str, endpoint: str | None = None) -> dict:
    """The manifest of an ingested dataset; FileNotFoundError if DST holds none (or its ingest
    never finished)."""
    uri = storage.join(data_path, MANIFEST)
    if not storage.is_file(uri, endpoint):
        raise FileNotFoundError(
            f"no {MANIFEST} in {storage.public_uri(data_path)}: "
            "not an ingested dataset, or its ingest did not finish"
        )
    manifest = json.loads(storage.read_bytes(uri, endpoint))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{uri}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}"
        )
    return manifest


def check_current(manifest: dict, where: str) -> None:
    """Refuse a dataset ingested before the digits padding (ARRAY_PADDING) existed: its USPS digits
    are at another scale than MNIST's, which quietly ruins CoGAN's pairs."""
    if manifest.get("layout") == "digits" and manifest.get("array_padding") != ARRAY_PADDING:
        raise ValueError(f"{where}: digits ingested without the current padding {ARRAY_PADDING} (USPS at "
                         f"MNIST's scale); ingest again: python jobs/prepare_data.py SRC {where}")


def split_counts(manifest: dict, split: str) -> dict[str, int]:
    if split not in manifest["counts"]:
        raise KeyError(f"split {split!r} not in the dataset; available: {sorted(manifest['counts'])}")
    return dict(sorted(manifest["counts"][split].items()))


def shard_uris(manifest: dict, data_path: str, split: str, domain: str) -> list[str]:
    return [
        storage.join(data_path, s["path"])
        for s in manifest["shards"]
        if s["split"] == split and s["domain"] == domain
    ]
