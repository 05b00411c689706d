"""Ingest image folders into sharded Parquet with a manifest; read them back as augmented tensors.

Layouts (SRC may be a local folder or s3://bucket/prefix):
- aligned:  `train/ val/ test/`, each image A|B side by side (left half is always domain a; which
  way to translate is a training setting). One row per pair, domain "ab".
- unpaired: `trainA/ trainB/ testA/ testB/` (CycleGAN). One row per image, domain "a" or "b".
  Labels come from `labels_<folder>.csv` beside the folders or `<folder>/labels.csv`
  (columns `filename,label`; MNIST-M style), when present.
- digits:   `.npz` arrays (one file, or a folder of one or two: sorted by name, domains a, b),
  keys `x`/`y` (all train) or `x_<split>`/`y_<split>`; uint8 N x H x W (gray) or N x H x W x 3.
  `usps.npz` is padded at ingest (ARRAY_PADDING), so that its digits match MNIST's in scale.

Output under DST: `<split>/<domain>/part-NNNNN-<hash>.parquet` plus `_manifest.json`, written
last. Readers only take the shards the manifest lists, so an interrupted ingest (which leaves at
most hidden temp files and complete but unlisted shards) is never read as a dataset. Shard names
carry a hash of their bytes, so re-running the same ingest rewrites identical files, and shards
that the new manifest does not list are removed after it is written.

Row schema: see SCHEMA. `id` is `<split>/<path relative to SRC>`; `index` numbers the rows of
one split and domain in id order and is what the readers shuffle.

Reading: `LocalReader` (no Ray; tests, demo, evaluation) and `augmented_dataset` / `ray_batches`
(Ray Data, for Ray Train workers) produce the same batches for the same seed, epoch, world size
and rank. See `epoch_plan` for the order and `Augment` for the per-sample randomness.
"""

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import images, storage

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
LAYOUTS = ("aligned", "unpaired", "digits")
DEFAULT_SHARD_ROWS = 1000
DEFAULT_SHARD_BYTES = 128 * 2**20
VAL_FRACTION = 0.1
PROBE_FILES = 32  # files per domain whose header votes on grayscale vs RGB
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

log = logging.getLogger(__name__)


class IngestError(ValueError):
    """The source, layout or options cannot be ingested; the message says what to change."""


class StrictRejects(IngestError):
    """--strict and some inputs were rejected; `.rejected` lists {path, reason}."""

    def __init__(self, rejected: list[dict]):
        self.rejected = rejected
        lines = "\n".join(f"  {r['path']}: {r['reason']}" for r in rejected)
        super().__init__(f"{len(rejected)} input(s) rejected (strict mode, nothing published):\n{lines}")


@dataclass
class Item:
    """One input image before checking: where it is and what it will be called."""

    split: str
    domain: str
    rel: str  # path relative to SRC ("train/1.jpg"; arrays: "usps.npz/x_train/000017")
    source: str  # public URI of the source file
    read: Callable[[], bytes]
    label: int | None = None
    sha256: str | None = None  # given for array items (over the raw pixels), else of the file bytes

    @property
    def id(self) -> str:
        return f"{self.split}/{self.rel}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ============================================================================= discovery


def _list_source(src: str, endpoint: str | None) -> tuple[str, list[str]]:
    """(root, files relative to root); a single file is listed from its folder."""
    if storage.is_file(src, endpoint):
        root, _, name = src.rstrip("/").rpartition("/")
        return root or ".", [name]
    files = [f for f in storage.list_files(src, endpoint) if not f.split("/")[-1].startswith(".")]
    if not files:
        raise IngestError(f"source {storage.public_uri(src)} is empty or does not exist")
    return src, files


def detect_layout(files: list[str]) -> tuple[str, str]:
    """(layout, reason) from the names only; raises IngestError when nothing fits."""
    tops = sorted({f.split("/")[0] for f in files if "/" in f})
    arrays = [f for f in files if "/" not in f and f.endswith(".npz")]
    if arrays:
        return "digits", f"found .npz arrays {arrays}"
    unpaired = [t for t in tops if _unpaired_folder(t, tops)]
    if unpaired:
        return "unpaired", f"found domain folders {unpaired}"
    aligned = [t for t in tops if t in ("train", "val", "test")]
    if aligned:
        return "aligned", f"found split folders {aligned}"
    raise IngestError(
        "cannot detect the layout: expected train/ val/ test/ folders (aligned), trainA/ trainB/ ... "
        f"(unpaired) or .npz arrays (digits); top level has folders {tops[:10]} and "
        f"{sum('/' not in f for f in files)} files"
    )


def _unpaired_folder(name: str, tops: list[str]) -> bool:
    """`trainA` style: ends in A or B and has its partner, or starts with a known split."""
    if len(name) < 2 or name[-1] not in "AB":
        return False
    partner = name[:-1] + ("B" if name[-1] == "A" else "A")
    return partner in tops or name[:-1] in ("train", "val", "test")


def discover(src: str, layout: str, endpoint: str | None) -> tuple[str, str, list[Item], list[str]]:
    """(layout, reason, items sorted by id, ignored files) for a source folder or file."""
    if layout not in ("auto", *LAYOUTS):
        raise IngestError(f"unknown layout {layout!r}: use one of auto, {', '.join(LAYOUTS)}")
    root, files = _list_source(src, endpoint)
    reason = "given"
    if layout == "auto":
        layout, reason = detect_layout(files)
    find = {"aligned": _aligned_items, "unpaired": _unpaired_items, "digits": _digit_items}[layout]
    items, ignored = find(root, files, endpoint)
    if not items:
        raise IngestError(f"no {layout} images found in {storage.public_uri(src)} (ignored: {ignored[:10]})")
    items.sort(key=lambda i: (i.split, i.domain, i.rel))
    return layout, reason, items, ignored


def _file_item(root: str, rel: str, split: str, domain: str, endpoint: str | None, label=None) -> Item:
    uri = storage.join(root, rel)
    return Item(split, domain, rel, storage.public_uri(uri), lambda: storage.read_bytes(uri, endpoint), label)


def _aligned_items(root: str, files: list[str], endpoint: str | None):
    items, ignored = [], []
    for rel in files:
        split = rel.split("/")[0]
        if "/" in rel and images.is_image_name(rel):
            items.append(_file_item(root, rel, split, "ab", endpoint))
        else:
            ignored.append(rel)
    return items, ignored


def _unpaired_items(root: str, files: list[str], endpoint: str | None):
    tops = sorted({f.split("/")[0] for f in files if "/" in f})
    items, ignored = [], []
    labels = {t: _labels(root, t, files, endpoint) for t in tops if _unpaired_folder(t, tops)}
    for rel in files:
        top, _, inner = rel.partition("/")
        if top not in labels or not images.is_image_name(rel):
            if not re.fullmatch(r"labels(_[^/]+)?\.csv", rel.split("/")[-1]):
                ignored.append(rel)
            continue
        split, domain = top[:-1], top[-1].lower()
        items.append(_file_item(root, rel, split, domain, endpoint, labels[top].get(inner)))
    return items, ignored


def _labels(root: str, folder: str, files: list[str], endpoint: str | None) -> dict[str, int]:
    """filename -> label from labels_<folder>.csv (beside) or <folder>/labels.csv, else {}."""
    for rel in (f"labels_{folder}.csv", f"{folder}/labels.csv"):
        if rel in files:
            return parse_labels(storage.read_bytes(storage.join(root, rel), endpoint), rel)
    return {}


def parse_labels(data: bytes, name: str) -> dict[str, int]:
    lines = data.decode("utf-8").splitlines()
    header = [h.strip() for h in lines[0].split(",")] if lines else []
    if header[:2] != ["filename", "label"]:
        raise IngestError(f"{name}: header must be 'filename,label', got {lines[0] if lines else ''!r}")
    labels = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        filename, _, value = line.partition(",")
        try:
            labels[filename.strip()] = int(value)
        except ValueError:
            raise IngestError(f"{name} line {number}: label {value!r} is not an integer") from None
    return labels


# USPS digits fill their 16×16 frame; MNIST's sit in a 28×28 frame with a 4-pixel margin. Read at
# one size, the two domains would show digits at different scales, which no shared generator layer
# can couple (CoGAN's pairs then disagree). The CoGAN reference pads USPS by 3 px on each side before
# resizing to 28 (mingyuliutw/CoGAN cogan/data/compute_optimal_alignment.py: "the optimal padding
# size is 3"); we do the same at ingest, with USPS's background value 0.
ARRAY_PADDING = {"usps.npz": 3}


def _digit_items(root: str, files: list[str], endpoint: str | None):
    arrays = [f for f in files if "/" not in f and f.endswith(".npz")]
    if not arrays or len(arrays) > 2:
        raise IngestError(f"digits layout needs one or two .npz files (domains a, b), found {arrays}")
    items = []
    for domain, name in zip("ab", arrays, strict=False):
        with np.load(io.BytesIO(storage.read_bytes(storage.join(root, name), endpoint))) as npz:
            for key in sorted(npz.files):
                if key == "x" or key.startswith("x_"):
                    split = key[2:] or "train"
                    labels = npz.get("y" + key[1:])
                    items += _array_items(root, name, key, split, domain, npz[key], labels)
    ignored = [f for f in files if f not in arrays]
    return items, ignored


def _array_items(root, name, key, split, domain, pixels: np.ndarray, labels) -> list[Item]:
    where = f"{name}[{key!r}]"
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or (pixels.ndim == 4 and pixels.shape[3] != 3):
        raise IngestError(
            f"{where}: expected uint8 N x H x W or N x H x W x 3, got {pixels.dtype} {pixels.shape}"
        )
    if labels is not None and len(labels) != len(pixels):
        raise IngestError(f"{where}: {len(pixels)} images but {len(labels)} labels")
    items = []
    pad = ARRAY_PADDING.get(os.path.basename(name), 0)
    if pad:
        pixels = np.pad(pixels, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (pixels.ndim - 3))
    for k in range(len(pixels)):
        rel = f"{name}/{key}/{k:06d}"
        label = None if labels is None else int(labels[k])
        row = pixels[k]
        items.append(
            Item(
                split,
                domain,
                rel,
                storage.public_uri(storage.join(root, name)) + f"#{key}[{k}]",
                lambda row=row: images.encode_array(row),
                label,
                sha256(row.tobytes()),
            )
        )
    return items


# ============================================================================= splits and channels


def carve_val(items: list[Item], fraction: float) -> tuple[list[Item], dict | None]:
    """Move a deterministic fraction of train to val when the source has no val split.

    Per domain, the round(fraction * n) train items with the smallest sha256 of their relative
    path go to val: stable across machines, file contents and re-runs.
    """
    splits = {i.split for i in items}
    if fraction <= 0 or "val" in splits or "train" not in splits:
        return items, None
    moved = {}
    for domain in sorted({i.domain for i in items if i.split == "train"}):
        train = [i for i in items if i.split == "train" and i.domain == domain]
        chosen = sorted(train, key=lambda i: sha256(i.rel.encode()))[: round(len(train) * fraction)]
        moved[domain] = {i.rel for i in chosen}
    out = [replace(i, split="val") if i.split == "train" and i.rel in moved[i.domain] else i for i in items]
    out.sort(key=lambda i: (i.split, i.domain, i.rel))
    rule = f"per domain, the round({fraction} * n) train files with the smallest sha256(relative path)"
    return out, {
        "from": "train",
        "fraction": fraction,
        "rule": rule,
        "files": {d: len(m) for d, m in moved.items()},
    }


def domain_channels(layout: str, items: list[Item]) -> dict[str, int]:
    """1 (gray) or 3 (RGB) per domain: aligned pairs are RGB; otherwise a header vote of the first
    PROBE_FILES files, so that MNIST stays 1 channel and a stray gray photo becomes RGB."""
    if layout == "aligned":
        return {"ab": 3}
    channels = {}
    for domain in sorted({i.domain for i in items}):
        sample = sorted((i for i in items if i.domain == domain), key=lambda i: i.rel)[:PROBE_FILES]
        votes = [images.probe_channels(_read_or_empty(i)) for i in sample]
        channels[domain] = 1 if votes.count(1) > votes.count(3) else 3
    return channels


def _read_or_empty(item: Item) -> bytes:
    try:
        return item.read()
    except OSError:
        return b""


# ============================================================================= ingest


@dataclass(frozen=True)
class _Options:
    channels: dict
    aligned: bool
    load_size: int | None
    max_pixels: int


def _check(item: Item, opts: _Options) -> tuple[dict | None, dict | None]:
    """(row, None) for a usable image, (None, reject) otherwise. StorageError propagates: a dead
    server is not a bad file."""
    try:
        data = item.read()
    except OSError as exc:
        return None, {"path": item.rel, "reason": f"cannot read: {exc}"}
    try:
        checked = images.check_image(
            data, opts.channels[item.domain], opts.aligned, opts.load_size, opts.max_pixels
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


def _ordered_map(fn, items: list, workers: int, window: int = 256) -> Iterator:
    """fn over items on a thread pool, results in input order, at most `window` in flight.
    Threads suit this: pillow decoding and S3 reads release the GIL."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(fn, items[start : start + window])


class _ShardWriter:
    """Collects rows of one split/domain at a time and writes a shard when it is full."""

    def __init__(self, dst: str, endpoint: str | None, shard_rows: int, shard_bytes: int):
        self.dst, self.endpoint = dst, endpoint
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
        storage.write_bytes(storage.join(self.dst, rel), data, self.endpoint)
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
    dst: str,
    layout: str = "auto",
    splits: list[str] | None = None,
    load_size: int | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    strict: bool = False,
    s3_endpoint: str | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_pixels: int = images.MAX_PIXELS,
    val_fraction: float = VAL_FRACTION,
    workers: int = 4,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Ingest SRC into sharded Parquet under DST and return the manifest (also at DST/_manifest.json).

    Raises IngestError for a missing / empty source, an unknown layout or split, or no usable
    image; StrictRejects when `strict` and any input was rejected (then no manifest is written
    and this run's new shards are removed); storage.StorageError when S3 fails after retries.
    """
    if shard_rows < 1 or shard_bytes < 1:
        raise IngestError(f"shard_rows and shard_bytes must be positive, got {shard_rows}, {shard_bytes}")
    layout, reason, items, ignored = discover(src, layout, s3_endpoint)
    log.info("layout: %s (%s)", layout, reason)
    items, val_info = carve_val(items, val_fraction)
    items = _only_splits(items, splits)
    opts = _Options(domain_channels(layout, items), layout == "aligned", load_size, max_pixels)
    previous = _previous_shards(dst, s3_endpoint)
    writer = _ShardWriter(dst, s3_endpoint, shard_rows, shard_bytes)
    rows, rejected, converted = _run(items, opts, writer, workers, progress)
    if not rows:
        raise IngestError(
            f"no usable images in {storage.public_uri(src)}: {len(rejected)} rejected {rejected[:3]}"
        )
    if strict and rejected:
        _remove_unlisted(dst, previous, s3_endpoint)
        raise StrictRejects(rejected)
    options = {
        "shard_rows": shard_rows,
        "shard_bytes": shard_bytes,
        "max_pixels": max_pixels,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    manifest = _manifest(
        src=src, layout=layout, reason=reason, load_size=load_size, channels=opts.channels, rows=rows,
        shards=writer.shards, rejected=rejected, converted=converted, ignored=ignored, val_info=val_info,
        options=options,
        command=command or _default_command(src, dst, layout, splits, load_size, shard_rows, strict),
    )  # fmt: skip
    storage.write_bytes(storage.join(dst, MANIFEST), json.dumps(manifest, indent=1).encode(), s3_endpoint)
    _remove_unlisted(dst, {s["path"] for s in writer.shards}, s3_endpoint)
    log.info(
        "ingested %d rows %s, %d rejected, %d converted, content hash %s",
        manifest["rows"],
        manifest["counts"],
        len(rejected),
        len(converted),
        manifest["content_hash"][:16],
    )
    return manifest


def _only_splits(items: list[Item], splits: list[str] | None) -> list[Item]:
    if not splits:
        return items
    have = sorted({i.split for i in items})
    unknown = sorted(set(splits) - set(have))
    if unknown:
        raise IngestError(f"split(s) {unknown} not in the source; available: {have}")
    return [i for i in items if i.split in splits]


def _run(
    items, opts, writer, workers, progress
) -> tuple[list[tuple[str, str, str, str, int | None]], list, list]:
    """Check every item (in id order) and stream the good ones into shards."""
    rows, rejected, converted = [], [], []
    index: dict[tuple[str, str], int] = {}
    bar = tqdm(total=len(items), unit="file", desc="ingest", disable=not progress, smoothing=0.1)
    bar.set_postfix(rejects=0, refresh=False)
    with bar:
        for row, reject in _ordered_map(lambda it: _check(it, opts), items, workers):
            bar.update()
            if reject:
                rejected.append(reject)
                bar.set_postfix(rejects=len(rejected), refresh=False)
                continue
            group = (row["split"], row["domain"])
            row["index"] = index.get(group, 0)
            index[group] = row["index"] + 1
            if changes := row.pop("changes"):
                converted.append({"path": row["id"].split("/", 1)[1], "changes": changes})
            writer.add(row)
            rows.append((row["id"], row["sha256"], row["split"], row["domain"], row["label"]))
        writer.flush()
    return rows, rejected, converted


def _manifest(*, src, layout, reason, load_size, channels, rows, shards, rejected, converted, ignored,
              val_info, options, command) -> dict:  # fmt: skip
    counts: dict[str, dict[str, int]] = {}
    labelled: dict[str, bool] = {}
    for _, _, split, domain, label in rows:
        counts.setdefault(split, {}).setdefault(domain, 0)
        counts[split][domain] += 1
        labelled[domain] = labelled.get(domain, True) and label is not None
    rejected = sorted(rejected, key=lambda r: r["path"])
    return {
        "schema_version": SCHEMA_VERSION,
        "layout": layout,
        "layout_reason": reason,
        "source": storage.public_uri(src),
        "load_size": load_size,
        "rows": len(rows),
        "counts": counts,
        "domains": {d: {"channels": channels[d], "labelled": labelled[d]} for d in sorted(labelled)},
        "content_hash": content_hash((row_id, digest) for row_id, digest, *_ in rows),
        "val_split": val_info,
        "shards": shards,
        "rejected": rejected,
        "converted": converted,
        "ignored": ignored,
        "options": options,
        "command": command,
        **({"array_padding": ARRAY_PADDING} if layout == "digits" else {}),
    }


def check_current(manifest: dict, where: str) -> None:
    """Refuse a dataset ingested before the digits padding (ARRAY_PADDING) existed: its USPS digits
    are at another scale than MNIST's, which quietly ruins CoGAN's pairs."""
    if manifest.get("layout") == "digits" and manifest.get("array_padding") != ARRAY_PADDING:
        raise ValueError(f"{where}: digits ingested without the current padding {ARRAY_PADDING} (USPS at "
                         f"MNIST's scale); ingest again: python jobs/prepare_data.py SRC {where}")


def content_hash(pairs) -> str:
    """sha256 over the sorted lines `id<TAB>sha256`, each ending in a newline."""
    lines = sorted(f"{row_id}\t{digest}\n" for row_id, digest in pairs)
    return sha256("".join(lines).encode())


def _default_command(src, dst, layout, splits, load_size, shard_rows, strict) -> str:
    args = [
        f"{storage.public_uri(src)!r}",
        f"{storage.public_uri(dst)!r}",
        f"layout={layout!r}",
        f"splits={splits!r}",
        f"load_size={load_size!r}",
        f"shard_rows={shard_rows!r}",
        f"strict={strict!r}",
    ]
    return f"pipeline.data.ingest({', '.join(args)})"


def _previous_shards(dst: str, endpoint: str | None) -> set[str]:
    try:
        return {s["path"] for s in read_manifest(dst, endpoint)["shards"]}
    except FileNotFoundError:
        return set()


def _remove_unlisted(dst: str, keep: set[str], endpoint: str | None) -> None:
    """Remove our shard and temp files that `keep` does not list (leftovers of earlier runs)."""
    for rel in storage.list_files(dst, endpoint):
        if (SHARD_NAME.match(rel) and rel not in keep) or TEMP_NAME.search(rel):
            storage.remove(storage.join(dst, rel), endpoint)


# ============================================================================= manifest


def read_manifest(dst: str, s3_endpoint: str | None = None) -> dict:
    """The manifest of an ingested dataset; FileNotFoundError if DST holds none (or its ingest
    never finished)."""
    uri = storage.join(dst, MANIFEST)
    if not storage.is_file(uri, s3_endpoint):
        raise FileNotFoundError(
            f"no {MANIFEST} in {storage.public_uri(dst)}: "
            "not an ingested dataset, or its ingest did not finish"
        )
    manifest = json.loads(storage.read_bytes(uri, s3_endpoint))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{uri}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}"
        )
    return manifest


def split_counts(manifest: dict, split: str) -> dict[str, int]:
    if split not in manifest["counts"]:
        raise KeyError(f"split {split!r} not in the dataset; available: {sorted(manifest['counts'])}")
    return dict(sorted(manifest["counts"][split].items()))


def shard_uris(manifest: dict, dst: str, split: str, domain: str) -> list[str]:
    return [
        storage.join(dst, s["path"])
        for s in manifest["shards"]
        if s["split"] == split and s["domain"] == domain
    ]


# ============================================================================= epoch order and augmentation


def epoch_plan(counts: dict[str, int], seed: int, epoch: int, world_size: int = 1, rank: int = 0):
    """(positions, {domain: row indices}) that rank `rank` of `world_size` reads this epoch.

    An epoch has n = max(domain sizes) positions. Each domain gets its own permutation (seeded by
    seed, epoch and domain; smaller domains repeat fresh permutations up to n), so unpaired A and
    B are shuffled independently. Rank r takes positions r, r + W, r + 2W, ..., cut to n // W so
    that every rank runs the same number of steps (DDP needs that).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    n = max(counts.values())
    if n < world_size:
        raise ValueError(f"{n} samples cannot be split over {world_size} workers")
    positions = np.arange(rank, n, world_size)[: n // world_size]
    plan = {}
    for code, (domain, size) in enumerate(sorted(counts.items())):
        rng = np.random.default_rng([seed, epoch, code])
        order = np.concatenate([rng.permutation(size) for _ in range(-(-n // size))])[:n]
        plan[domain] = order[positions]
    return positions, plan


@dataclass(frozen=True)
class Augment:
    """Decode + resize + crop + flip of one stored image; its randomness depends only on
    (seed, epoch, position, domain), so batching, worker count and Ray vs local cannot change it."""

    crop_size: int | None
    load_size: int | None
    flip: bool
    seed: int
    epoch: int
    channels: dict  # domain -> 1 | 3

    def sample(self, domain: str, data: bytes, position: int) -> list[np.ndarray]:
        """uint8 H x W x C arrays: [a, b] for an aligned pair, [x] otherwise."""
        pixels = images.decode(data, self.channels[domain])
        parts = (
            [pixels[:, : pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2 :]]
            if domain == "ab"
            else [pixels]
        )
        if self.load_size:
            parts = [images.resize_array(p, self.load_size) for p in parts]
        code = {"ab": 0, "a": 1, "b": 2}.get(domain, 3)
        rng = np.random.default_rng([self.seed, self.epoch, int(position), code])
        return images.crop_flip(parts, rng, self.crop_size, self.flip)


def _keys(domain: str) -> list[str]:
    return ["a", "b"] if domain == "ab" else [domain]


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}: images of different sizes {sorted(shapes)[:3]}: pass load_size (or crop_size)"
        )
    return np.stack(arrays)


def to_float(batch: dict) -> dict:
    """Images of a torch batch, uint8 N x H x W x C, -> float32 N x C x H x W in [-1, 1]; labels
    untouched. Batches travel as uint8 HWC (a quarter of float32's bytes through Ray's object
    store and to the GPU) and are converted here, on whatever device they are, in one pass."""
    import torch  # ingest and the Ray tasks that only decode never need torch

    def convert(x):
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return x.div_(127.5).sub_(1.0)

    return {k: convert(v) if v.dtype == torch.uint8 else v for k, v in batch.items()}


def _reader_settings(manifest: dict, load_size, channels) -> tuple[int | None, dict]:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None (as stored), 1 or 3, got {channels!r}")
    load = load_size or manifest.get("load_size")
    chans = {d: channels or info["channels"] for d, info in manifest["domains"].items()}
    return load, chans


# ============================================================================= local reader


class LocalReader:
    """Batches of one split without Ray: `{"a": N x C x H x W float32 in [-1, 1], "b": ...}`.

    aligned: a is the left half and b the right half of the same pairs, with the same crop and
    flip; unpaired / digits: a and b are independently shuffled (a split with one domain yields
    only that domain's key). `label_a` / `label_b` (int64) are added for domains whose every row
    has a label. Channels are as stored: grayscale domains (MNIST) give 1 channel, RGB 3; pass channels=3 to
    replicate gray to RGB (or channels=1 to get luma). load_size None uses the stored size (the
    ingest's --load-size if any); crop_size None keeps the whole (resized) image; flip=False and
    crop_size=None give un-augmented images for evaluation.

    The same seed, epoch, world_size and rank give the same batches, equal to Ray's
    `augmented_dataset`. Call `set_epoch(e)` (or pass epoch=) to reshuffle. The split's encoded
    images are held in memory: fine for the datasets here and the demo; Ray Data streams.
    """

    def __init__(
        self,
        dst: str,
        split: str,
        crop_size: int | None = None,
        load_size: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        flip: bool = True,
        world_size: int = 1,
        rank: int = 0,
        channels: int | None = None,
        drop_last: bool = False,
        s3_endpoint: str | None = None,
        skip: int = 0,
    ):
        self.manifest = read_manifest(dst, s3_endpoint)
        self.skip = skip  # samples of this rank's first epoch already consumed (resume)
        self.counts = split_counts(self.manifest, split)
        self.split, self.batch_size, self.drop_last = split, batch_size, drop_last
        self.seed, self.epoch, self.world_size, self.rank = seed, epoch, world_size, rank
        load, chans = _reader_settings(self.manifest, load_size, channels)
        self.augment = Augment(crop_size, load, flip, seed, epoch, chans)
        self.tables = {d: _read_table(self.manifest, dst, split, d, s3_endpoint) for d in self.counts}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch
        self.augment = replace(self.augment, epoch=epoch)

    def __len__(self) -> int:
        steps = max(self.counts.values()) // self.world_size
        return steps // self.batch_size if self.drop_last else -(-steps // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        import torch  # only the tensor hand-off needs torch; ingest does not

        positions, plan = epoch_plan(self.counts, self.seed, self.epoch, self.world_size, self.rank)
        for start in range(self.skip, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            batch = {}
            for domain, table in self.tables.items():
                rows = plan[domain][start:stop]
                samples = [
                    self.augment.sample(domain, table["image"][r], p)
                    for r, p in zip(rows, positions[start:stop], strict=True)
                ]
                for k, key in enumerate(_keys(domain)):
                    batch[key] = torch.from_numpy(_stack([s[k] for s in samples], f"{self.split}/{domain}"))
                if domain != "ab" and self.manifest["domains"][domain]["labelled"]:
                    batch[f"label_{domain}"] = torch.from_numpy(table["label"][rows])
            yield to_float(batch)


def _read_table(manifest: dict, dst: str, split: str, domain: str, endpoint: str | None) -> dict:
    """{"image": list of bytes, "label": int64 array} of one split/domain, in index order."""
    tables = []
    for uri in shard_uris(manifest, dst, split, domain):
        fs, path = storage.arrow_filesystem(uri, endpoint)
        tables.append(pq.read_table(path, filesystem=fs, columns=["index", "image", "label"]))
    table = pa.concat_tables(tables).sort_by("index")
    labels = table["label"].to_numpy(zero_copy_only=False) if table["label"].null_count == 0 else None
    return {"image": table["image"].to_pylist(), "label": None if labels is None else labels.astype(np.int64)}


# ============================================================================= Ray Data


def ray_dataset(
    dst: str,
    split: str,
    domain: str | None = None,
    columns: list[str] | None = None,
    s3_endpoint: str | None = None,
):
    """The raw rows (SCHEMA) of one split, optionally one domain, as a Ray Dataset: only the shards
    the manifest lists. For batch translation: map_batches over `image` with images.decode."""
    import ray.data

    manifest = read_manifest(dst, s3_endpoint)
    domains = [domain] if domain else list(split_counts(manifest, split))
    uris = [u for d in domains for u in shard_uris(manifest, dst, split, d)]
    if not uris:
        raise KeyError(f"no shards for split {split!r} domain {domain!r} in {storage.public_uri(dst)}")
    fs, _ = storage.arrow_filesystem(dst, s3_endpoint)
    paths = [storage.arrow_filesystem(u, s3_endpoint)[1] for u in uris]
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=None)
    return ds.select_columns(columns) if columns else ds


def augmented_dataset(
    dst: str,
    split: str,
    crop_size: int | None = None,
    load_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    flip: bool = True,
    world_size: int = 1,
    rank: int = 0,
    channels: int | None = None,
    s3_endpoint: str | None = None,
    skip: int = 0,
):
    """This rank's samples for one epoch, decoded and augmented, in epoch order, as a Ray Dataset with
    columns a, b (uint8 H x W x C: a quarter of float32's bytes through the object store) and
    label_a / label_b where labelled. `to_float` on its torch batches gives float32 in [-1, 1],
    row for row equal to LocalReader with the same arguments (`ray_batches` does both).

    The pipeline: read_parquet of the split's shards -> keep the rows `epoch_plan` gives this
    rank, tagged with their position -> sort by position (the epoch's shuffle; the split points
    are known, so no sampling) -> decode and augment each position's rows with `Augment` (a and b
    of one position always share a block).
    """
    manifest = read_manifest(dst, s3_endpoint)
    counts = split_counts(manifest, split)
    load, chans = _reader_settings(manifest, load_size, channels)
    augment = Augment(crop_size, load, flip, seed, epoch, chans)
    positions, plan = epoch_plan(counts, seed, epoch, world_size, rank)
    if skip:  # resume mid-epoch: the remaining samples are unchanged (augmentation keys on position)
        positions, plan = positions[skip:], {d: rows[skip:] for d, rows in plan.items()}
        if not len(positions):
            raise ValueError(f"skip={skip} consumes the whole epoch of {skip} samples")
    labelled = [d for d in counts if d != "ab" and manifest["domains"][d]["labelled"]]
    columns = ["domain", "index", "image"] + (["label"] if labelled else [])
    ds = ray_dataset(dst, split, columns=columns, s3_endpoint=s3_endpoint)
    _small_sort_settings(ds.context)
    ds = ds.map_batches(
        _select_rows, batch_format="pyarrow", fn_kwargs={"plan": plan, "positions": positions}
    )
    ds = ds.sort("pos", boundaries=_sort_boundaries(manifest, split, positions))
    ds = ds.map_batches(
        _augment_rows,
        batch_format="numpy",
        batch_size=None,
        fn_kwargs={"augment": augment, "domains": list(counts), "labelled": labelled},
    )
    return ds


def _small_sort_settings(context) -> None:
    """Settings of this dataset only (its context is a copy, shared by the datasets derived from
    it): epoch order is part of determinism, and the task-based sort starts in a fraction of the
    time of the default actor-based shuffle (measured: 2 s vs 6.6 s per facades epoch)."""
    from ray.data.context import ShuffleStrategy

    context.execution_options.preserve_order = True
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def _sort_boundaries(manifest: dict, split: str, positions: np.ndarray, partitions: int = 8) -> list[int]:
    """Split points for the sort. The positions are known, so Ray need not sample them. About
    `partitions` partitions (Ray's default is 200: seconds of overhead for a small epoch), each
    under 32 MiB so that it stays one block and both rows of a position reach `_augment_rows`
    together."""
    shards = [s for s in manifest["shards"] if s["split"] == split]
    row_bytes = sum(s["bytes"] for s in shards) / max(1, sum(s["rows"] for s in shards))
    by_bytes = 32 * 2**20 / max(row_bytes, 1) / len({s["domain"] for s in shards})
    per_partition = int(np.clip(min(by_bytes, -(-len(positions) // partitions)), 1, 256))
    return positions[per_partition::per_partition].tolist() or [int(positions[-1]) + 1]


def _select_rows(table: pa.Table, plan: dict, positions: np.ndarray) -> pa.Table:
    """Keep the rows this rank reads, once per position that reads them, tagged with `pos`."""
    domains = np.array(table["domain"].to_pylist(), dtype=object)
    indices = table["index"].to_numpy()
    take, pos = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for domain, wanted in plan.items():
        rows = np.flatnonzero(domains == domain)
        order = np.argsort(wanted, kind="stable")
        lo = np.searchsorted(wanted[order], indices[rows], "left")
        hi = np.searchsorted(wanted[order], indices[rows], "right")
        take.append(np.repeat(rows, hi - lo))
        pos += [positions[order[a:b]] for a, b in zip(lo, hi, strict=True)]
    out = table.take(pa.array(np.concatenate(take), pa.int64())).drop_columns(["index"])
    if "label" in out.column_names:
        out = out.set_column(out.column_names.index("label"), "label", out["label"].fill_null(-1))
    return out.append_column("pos", pa.array(np.concatenate(pos).astype(np.int64)))


def _augment_rows(batch: dict, augment: Augment, domains: list[str], labelled: list[str]) -> dict:
    """One output row per position, with every domain's sample of that position."""
    if len(batch["pos"]) == 0:
        return {}
    by_position: dict[int, dict[str, int]] = {}
    for row, (pos, domain) in enumerate(zip(batch["pos"].tolist(), batch["domain"].tolist(), strict=True)):
        by_position.setdefault(pos, {})[domain] = row
    out: dict[str, list] = {}
    for pos in sorted(by_position):
        rows = by_position[pos]
        if sorted(rows) != sorted(domains):
            raise RuntimeError(
                f"position {pos} has domains {sorted(rows)}, expected {domains}: a block was split"
            )
        for domain in domains:
            sample = augment.sample(domain, bytes(batch["image"][rows[domain]]), pos)
            for key, pixels in zip(_keys(domain), sample, strict=True):
                out.setdefault(key, []).append(pixels)
            if domain in labelled:
                out.setdefault(f"label_{domain}", []).append(int(batch["label"][rows[domain]]))
    return {
        key: _stack(v, key) if not key.startswith("label_") else np.array(v, np.int64)
        for key, v in out.items()
    }


def ray_batches(
    dst: str,
    split: str,
    batch_size: int,
    crop_size: int | None = None,
    load_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    flip: bool = True,
    world_size: int | None = None,
    rank: int | None = None,
    channels: int | None = None,
    drop_last: bool = True,
    s3_endpoint: str | None = None,
    skip: int = 0,
) -> Iterator[dict]:
    """Torch batches of this Ray Train worker's shard for one epoch (call once per epoch).

    world_size / rank default to the Ray Train context, so inside train_loop_per_worker
    `ray_batches(dst, "train", 4, crop_size=256, seed=cfg.seed, epoch=e)` is enough. Each worker
    reads its own deterministic shard instead of `get_dataset_shard`, whose split depends on
    timing; drop_last=True keeps the step count equal on all workers.
    """
    if world_size is None or rank is None:
        import ray.train

        context = ray.train.get_context()
        world_size, rank = context.get_world_size(), context.get_world_rank()
    ds = augmented_dataset(
        dst, split, crop_size, load_size, seed, epoch, flip, world_size, rank, channels, s3_endpoint, skip
    )
    return (to_float(b) for b in ds.iter_torch_batches(batch_size=batch_size, drop_last=drop_last))
