"""Ingest image folders into sharded Parquet with a manifest (layouts: see `pipeline.data`).

Output under DST: `<split>/<domain>/part-NNNNN-<hash>.parquet` plus `_manifest.json`, written
last. Shard names carry a hash of their bytes, so re-running the same ingest rewrites identical
files, and shards that the new manifest does not list are removed after it is written.
"""

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import images, storage
from pipeline.data.manifest import (
    ARRAY_PADDING,
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    SHARD_NAME,
    TEMP_NAME,
    content_hash,
    read_manifest,
    sha256,
)
from pipeline.data.sources import VAL_FRACTION, IngestError, Item, carve_val, discover, domain_channels

DEFAULT_SHARD_ROWS = 1000
DEFAULT_SHARD_BYTES = 128 * 2**20

log = logging.getLogger(__name__)


class StrictRejects(IngestError):
    """--strict and some inputs were rejected; `.rejected` lists {path, reason}."""

    def __init__(self, rejected: list[dict]):
        self.rejected = rejected
        lines = "\n".join(f"  {r['path']}: {r['reason']}" for r in rejected)
        super().__init__(f"{len(rejected)} input(s) rejected (strict mode, nothing published):\n{lines}")


@dataclass(frozen=True)
class IngestOptions:
    """How to ingest: the layout ("auto" detects it), which splits (None: all), the stored size
    (None: as found), shard limits, the largest image accepted, the smallest side accepted (aligned:
    of each half), the share of train carved into val
    when the source has none, whether any reject fails the ingest, and decoding threads."""

    layout: str = "auto"
    splits: list[str] | None = None
    load_size: int | None = None
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_pixels: int = images.MAX_PIXELS
    min_side: int = images.MIN_SIDE
    val_fraction: float = VAL_FRACTION
    strict: bool = False
    workers: int = 4


@dataclass
class _Found:
    """What discovery found: the layout and why, the items to check, and what was set aside."""

    layout: str
    reason: str
    items: list[Item]
    ignored: list[str]
    rejected: list[dict]  # entries of the source that could not be taken (unlistable, links out, ...)
    val_info: dict | None
    channels: dict


@dataclass
class _Written:
    """What checking and writing produced: (id, sha256, split, domain, label) per row, shards, rejects."""

    rows: list[tuple[str, str, str, str, int | None]]
    shards: list[dict]
    rejected: list[dict]
    converted: list[dict]


@dataclass(frozen=True)
class _Options:
    channels: dict
    aligned: bool
    load_size: int | None
    max_pixels: int
    min_side: int


def _check(item: Item, opts: _Options) -> tuple[dict | None, dict | None]:
    """(row, None) for a usable image, (None, reject) otherwise: whatever goes wrong with one file
    is its reject reason. StorageError propagates: a dead server is not a bad file."""
    try:
        data = item.read()
    except storage.StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError mostly; never the file's contents in the reason
        return None, {"path": item.rel, "reason": f"cannot read: {_read_error(exc)}"}
    try:
        checked = images.check_image(
            data, opts.channels[item.domain], opts.aligned, opts.load_size, opts.max_pixels, opts.min_side
        )
    except images.Rejected as exc:
        return None, {"path": item.rel, "reason": str(exc)}
    row = {
        "id": item.id,
        "split": item.split,
        "domain": item.domain,
        "index": -1,
        "image": checked.data,
        "format": checked.format,
        "width": checked.width,
        "height": checked.height,
        "channels": checked.channels,
        "label": item.label,
        "source": item.source,
        "sha256": item.sha256 or sha256(data),
        "changes": checked.changes,
    }
    return row, None


def _read_error(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # "Permission denied": the path is already in the reject
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _ordered_map(fn, items: list, workers: int, window: int = 256) -> Iterator:
    """fn over items on a thread pool, results in input order, at most `window` in flight.
    Threads suit this: pillow decoding and S3 reads release the GIL."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(fn, items[start : start + window])


class _ShardWriter:
    """Collects rows of one split/domain at a time and writes a shard when it is full."""

    def __init__(self, data_path: str, endpoint: str | None, shard_rows: int, shard_bytes: int):
        self.data_path, self.endpoint = data_path, endpoint
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.rows, self.size, self.group, self.part = [], 0, None, 0
        self.shards = []

    def add(self, row: dict) -> None:
        group = (row["split"], row["domain"])
        if group != self.group:
            self.flush()
            self.group, self.part = group, 0
        if self.size + len(row["image"]) > self.shard_bytes:
            self.flush()  # keep shards under shard_bytes of images (a single bigger image goes alone)
        self.rows.append(row)
        self.size += len(row["image"])
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="none", row_group_size=256)  # images are compressed
        data = buf.getvalue()
        digest = sha256(data)
        split, domain = self.group
        rel = f"{split}/{domain}/part-{self.part:05d}-{digest[:16]}.parquet"
        storage.write_bytes(storage.join(self.data_path, rel), data, self.endpoint)
        self.shards.append(
            {
                "path": rel,
                "split": split,
                "domain": domain,
                "rows": len(self.rows),
                "bytes": len(data),
                "sha256": digest,
            }
        )
        self.rows, self.size, self.part = [], 0, self.part + 1


def ingest(
    src: str,
    data_path: str,
    options: IngestOptions | None = None,
    endpoint: str | None = None,
    *,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Ingest SRC into sharded Parquet under DST and return the manifest (also at DST/_manifest.json).

    Raises IngestError for a missing / empty source, an unknown layout or split, or no usable
    image; StrictRejects when `options.strict` and any input was rejected (then no manifest is
    written and this run's new shards are removed); storage.StorageError when S3 fails after retries.
    """
    opts = options or IngestOptions()
    if opts.shard_rows < 1 or opts.shard_bytes < 1 or opts.min_side < 1:
        raise IngestError(
            "shard_rows, shard_bytes and min_side must be positive, got "
            f"{opts.shard_rows}, {opts.shard_bytes}, {opts.min_side}"
        )
    found = _find(src, opts, endpoint)
    previous = _previous_shards(data_path, endpoint)
    writer = _ShardWriter(data_path, endpoint, opts.shard_rows, opts.shard_bytes)
    written = _write(found, opts, writer, progress)
    if not written.rows:
        rejected = written.rejected
        raise IngestError(
            f"no usable images in {storage.public_uri(src)}: {len(rejected)} rejected {rejected[:3]}"
        )
    if opts.strict and written.rejected:
        _remove_unlisted(data_path, previous, endpoint)
        raise StrictRejects(written.rejected)
    manifest = _manifest(src, opts, found, written, command or _default_command(src, data_path, opts))
    storage.write_bytes(storage.join(data_path, MANIFEST), json.dumps(manifest, indent=1).encode(), endpoint)
    _remove_unlisted(data_path, {s["path"] for s in written.shards}, endpoint)
    log.info(
        "ingested %d rows %s, %d rejected, %d converted, content hash %s",
        manifest["rows"],
        manifest["counts"],
        len(written.rejected),
        len(written.converted),
        manifest["content_hash"][:16],
    )
    return manifest


def _find(src: str, opts: IngestOptions, endpoint: str | None) -> _Found:
    layout, reason, items, ignored, rejected = discover(src, opts.layout, endpoint)
    log.info("layout: %s (%s)", layout, reason)
    items, val_info = carve_val(items, opts.val_fraction)
    items = _only_splits(items, opts.splits)
    return _Found(layout, reason, items, ignored, rejected, val_info, domain_channels(layout, items))


def _only_splits(items: list[Item], splits: list[str] | None) -> list[Item]:
    if not splits:
        return items
    have = sorted({i.split for i in items})
    unknown = sorted(set(splits) - set(have))
    if unknown:
        raise IngestError(f"split(s) {unknown} not in the source; available: {have}")
    return [i for i in items if i.split in splits]


def _write(found: _Found, opts: IngestOptions, writer: "_ShardWriter", progress: bool) -> _Written:
    """Check every item (in id order) and stream the good ones into shards."""
    aligned = found.layout == "aligned"
    check = _Options(found.channels, aligned, opts.load_size, opts.max_pixels, opts.min_side)
    out = _Written([], writer.shards, list(found.rejected), [])
    index: dict[tuple[str, str], int] = {}
    bar = tqdm(total=len(found.items), unit="file", desc="ingest", disable=not progress, smoothing=0.1)
    bar.set_postfix(rejects=0, refresh=False)
    with bar:
        for row, reject in _ordered_map(lambda it: _check(it, check), found.items, opts.workers):
            bar.update()
            if reject:
                out.rejected.append(reject)
                bar.set_postfix(rejects=len(out.rejected), refresh=False)
                continue
            group = (row["split"], row["domain"])
            row["index"] = index.get(group, 0)
            index[group] = row["index"] + 1
            if changes := row.pop("changes"):
                out.converted.append({"path": row["id"].split("/", 1)[1], "changes": changes})
            writer.add(row)
            out.rows.append((row["id"], row["sha256"], row["split"], row["domain"], row["label"]))
        writer.flush()
    return out


def _manifest(src: str, opts: IngestOptions, found: _Found, written: _Written, command: str) -> dict:
    counts: dict[str, dict[str, int]] = {}
    labelled: dict[str, bool] = {}
    for _, _, split, domain, label in written.rows:
        counts.setdefault(split, {}).setdefault(domain, 0)
        counts[split][domain] += 1
        labelled[domain] = labelled.get(domain, True) and label is not None
    options = {
        "shard_rows": opts.shard_rows,
        "shard_bytes": opts.shard_bytes,
        "max_pixels": opts.max_pixels,
        "min_side": opts.min_side,
        "val_fraction": opts.val_fraction,
        "splits": opts.splits,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "layout": found.layout,
        "layout_reason": found.reason,
        "source": storage.public_uri(src),
        "load_size": opts.load_size,
        "rows": len(written.rows),
        "counts": counts,
        "domains": {d: {"channels": found.channels[d], "labelled": labelled[d]} for d in sorted(labelled)},
        "content_hash": content_hash((row_id, digest) for row_id, digest, *_ in written.rows),
        "val_split": found.val_info,
        "shards": written.shards,
        "rejected": sorted(written.rejected, key=lambda r: r["path"]),
        "converted": written.converted,
        "ignored": found.ignored,
        "options": options,
        "command": command,
        **({"array_padding": ARRAY_PADDING} if found.layout == "digits" else {}),
    }


def _default_command(src: str, data_path: str, opts: IngestOptions) -> str:
    """The call that repeats this ingest, recorded in the manifest."""
    return f"pipeline.data.ingest({storage.public_uri(src)!r}, {storage.public_uri(data_path)!r}, {opts!r})"


def _previous_shards(data_path: str, endpoint: str | None) -> set[str]:
    try:
        return {s["path"] for s in read_manifest(data_path, endpoint)["shards"]}
    except FileNotFoundError:
        return set()


def _remove_unlisted(data_path: str, keep: set[str], endpoint: str | None) -> None:
    """Remove our shard and temp files that `keep` does not list (leftovers of earlier runs)."""
    for rel in storage.list_files(data_path, endpoint):
        if (SHARD_NAME.match(rel) and rel not in keep) or TEMP_NAME.search(rel):
            storage.remove(storage.join(data_path, rel), endpoint)
