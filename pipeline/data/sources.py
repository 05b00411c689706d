"""Find the inputs of an ingest: list a source, detect its layout, name every image as an `Item`,
carve a validation split when the source has none, and decide each domain's channels."""

import io
import os
import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from pipeline import images, storage
from pipeline.data.manifest import ARRAY_PADDING, sha256

LAYOUTS = ("aligned", "unpaired", "digits")
VAL_FRACTION = 0.1
PROBE_FILES = 32  # files per domain whose header votes on grayscale vs RGB


class IngestError(ValueError):
    """The source, layout or options cannot be ingested; the message says what to change."""


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


# ============================================================================= discovery


def _list_source(src: str, endpoint: str | None) -> tuple[str, list[str], list[dict]]:
    """(root, files relative to root, rejected {path, reason}); a single file is listed from its folder."""
    if storage.is_file(src, endpoint):
        root, _, name = src.rstrip("/").rpartition("/")
        return root or ".", [name], []
    if storage.is_s3(src):
        files, rejected = storage.list_files(src, endpoint), []
    else:
        files, rejected = _walk_local(src)
    files = [f for f in files if not f.split("/")[-1].startswith(".")]
    if not files:
        raise IngestError(
            f"source {storage.public_uri(src)} is empty or does not exist"
            + "".join(f"; {r['path']}: {r['reason']}" for r in rejected[:5])
        )
    return src, files, rejected


def _walk_local(src: str) -> tuple[list[str], list[dict]]:
    """(usable files, rejected {path, reason}) under a local folder, so that every entry is counted
    once: a folder that cannot be listed, a link that leaves the source, a name that is not UTF-8
    (it could not be stored or printed) and a FIFO or device (reading it could block) are rejected
    rather than silently skipped or followed. Links to folders inside the source are not followed
    (their files are counted where they are); they are rejected with that reason."""
    inside = _inside(src)
    files, rejected = [], []

    def reject(path: str, reason: str, folder: str = "") -> None:
        rel = os.path.relpath(path, src).replace(os.sep, "/") + folder
        rejected.append({"path": os.fsencode(rel).decode("utf-8", "backslashreplace"), "reason": reason})

    def unlistable(exc: OSError) -> None:
        reject(exc.filename, f"cannot list the folder: {exc.strerror or type(exc).__name__}", "/")

    for folder, dirs, names in os.walk(src, onerror=unlistable):
        for name in dirs:  # os.walk does not descend into links to folders
            path = os.path.join(folder, name)
            if os.path.islink(path):
                reject(path, "symlinked folder not followed" if inside(path) else LINK_OUT, "/")
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, src).replace(os.sep, "/")
            if why := _unusable(path, rel, inside):
                reject(path, why)
            else:
                files.append(rel)
    return sorted(files), sorted(rejected, key=lambda r: r["path"])


LINK_OUT = "symlink leaves the source"


def _inside(src: str) -> Callable[[str], bool]:
    """Whether a path, links resolved, is under src (links resolved)."""
    root = os.path.realpath(src)
    return lambda path: os.path.commonpath([root, os.path.realpath(path)]) == root


def _unusable(path: str, rel: str, inside: Callable[[str], bool]) -> str | None:
    try:
        rel.encode("utf-8")  # only the part that is stored (the source folder's own name may be anything)
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (shown escaped): rename it"
    if not inside(path):
        return LINK_OUT
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or type(exc).__name__}"  # a dangling link, a vanished file
    return None


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


def discover(
    src: str, layout: str, endpoint: str | None
) -> tuple[str, str, list[Item], list[str], list[dict]]:
    """(layout, reason, items sorted by id, ignored files, rejected {path, reason}) for a source
    folder or file; rejected are the entries that cannot be taken at all (see _walk_local)."""
    if layout not in ("auto", *LAYOUTS):
        raise IngestError(f"unknown layout {layout!r}: use one of auto, {', '.join(LAYOUTS)}")
    root, files, rejected = _list_source(src, endpoint)
    reason = "given"
    if layout == "auto":
        layout, reason = detect_layout(files)
    find = {"aligned": _aligned_items, "unpaired": _unpaired_items, "digits": _digit_items}[layout]
    items, ignored = find(root, files, endpoint)
    if not items:
        raise IngestError(f"no {layout} images found in {storage.public_uri(src)} (ignored: {ignored[:10]})")
    items.sort(key=lambda i: (i.split, i.domain, i.rel))
    return layout, reason, items, ignored, rejected


def _file_item(root: str, rel: str, split: str, domain: str, endpoint: str | None, label=None) -> Item:
    uri = storage.join(root, rel)
    return Item(split, domain, rel, storage.public_uri(uri), lambda: _read(root, uri, endpoint), label)


def _read(root: str, uri: str, endpoint: str | None) -> bytes:
    """The file's bytes; a local link is checked again when read (it may have changed since listing)."""
    if not storage.is_s3(uri) and not _inside(root)(uri):
        raise OSError(LINK_OUT)
    return storage.read_bytes(uri, endpoint)


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
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise IngestError(f"{name}: not UTF-8 text") from None
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


def _digit_items(root: str, files: list[str], endpoint: str | None):
    arrays = [f for f in files if "/" not in f and f.endswith(".npz")]
    if not arrays or len(arrays) > 2:
        raise IngestError(f"digits layout needs one or two .npz files (domains a, b), found {arrays}")
    items = []
    for domain, name in zip("ab", arrays, strict=False):
        with _open_npz(root, name, endpoint) as npz:
            for key in sorted(npz.files):
                if key == "x" or key.startswith("x_"):
                    split = key[2:] or "train"
                    labels = _array(npz, name, "y" + key[1:]) if "y" + key[1:] in npz.files else None
                    items += _array_items(root, name, key, split, domain, _array(npz, name, key), labels)
    ignored = [f for f in files if f not in arrays]
    return items, ignored


# what numpy raises on a file that is no .npz archive, a damaged member, or an object (pickle) array
NPZ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError)


def _open_npz(root: str, name: str, endpoint: str | None):
    """The archive `name`, or an IngestError naming it (a domain is one file: there is nothing else
    of it to ingest). The reason is numpy's kind of error, never the file's bytes."""
    blob = storage.read_bytes(storage.join(root, name), endpoint)
    try:
        return np.load(io.BytesIO(blob))
    except NPZ_ERRORS as e:
        raise IngestError(f"{name}: not a readable .npz archive ({type(e).__name__}); "
                          "save the arrays with numpy.savez as x_<split> / y_<split>") from None  # fmt: skip


def _array(npz, name: str, key: str) -> np.ndarray:
    try:
        return npz[key]
    except NPZ_ERRORS as e:
        raise IngestError(f"{name}[{key!r}]: unreadable array ({type(e).__name__}); "
                          "save numeric arrays with numpy.savez (no object arrays)") from None  # fmt: skip


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
