"""The output folder: its files and its output index `_manifest.json` (entries by
"<input sha256>/<sample>", rejected inputs, run records), and the claim that stops a run when a later
one takes the folder over."""

import json
import logging
import os
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import data, storage
from pipeline.translate.job import Work

log = logging.getLogger(__name__)

OUTPUT_INDEX = "_manifest.json"  # the file name predates the name: existing folders keep it
KIND = "transmute.translations"
RUN_FILE = ".translate-run.json"  # the run writing the folder now (hidden: never taken for an output)
SCHEMA_VERSION = 1
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".parquet")  # what a run may remove when unlisted
KEPT_RUNS = 20  # run records kept in the output index


class OutputError(ValueError):
    """The output folder cannot be used; the message says what to do."""


OUTPUT_SCHEMA = pa.schema([
    ("output_id", pa.string()), ("image", pa.binary()), ("format", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("channels", pa.int8()), ("key", pa.string()), ("input_id", pa.string()),
    ("input_sha256", pa.string()), ("input_part", pa.string()), ("sample", pa.int32()),
    ("z_seed", pa.int64()), ("z_t", pa.float64()), ("model", pa.string()), ("model_version", pa.string()),
    ("run_id", pa.string()), ("model_uri", pa.string()), ("model_key", pa.string()),
    ("model_type", pa.string()), ("direction", pa.string()), ("bn_mode", pa.string()),
    ("job_key", pa.string()),
])


class Outputs:
    """The output folder and its `_manifest.json`; only the driver writes the output index."""

    def __init__(self, root: str, endpoint: str | None = None):
        self.root, self.endpoint = root, endpoint
        self.index: dict = {}
        self.last_commit = 0.0
        self.token = uuid.uuid4().hex

    @property
    def entries(self) -> dict:
        return self.index["entries"]

    @property
    def rejected(self) -> dict:
        """input sha256 -> {input_id, reason}: inputs that cannot be decoded are not tried again
        until their content changes (a new sha256); inputs that cannot be read at all (a dangling
        link, a special file) under `unreadable_key(path)` until they can be read."""
        return self.index["rejected"]

    def open(self, work: Work, header: dict, overwrite: bool = False) -> None:
        """Load or start the output index, drop what this work would make differently, commit, and
        remove every output file the output index does not list."""
        self.index = self._load() or self._refuse_foreign()
        claim = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": now()}
        storage.write_bytes(self._run_file(), json.dumps(claim).encode(), self.endpoint)
        old = self.index.get("entries", {})
        kept = {} if overwrite else {k: e for k, e in old.items() if e.get("job_key") == work.key}
        if len(kept) < len(old):
            log.info("%d earlier outputs were made %s: redoing them", len(old) - len(kept),
                     "before --overwrite" if overwrite else "by another model version or other settings")
        rejected = {} if overwrite else {k: r for k, r in self.index.get("rejected", {}).items()
                                         if r.get("job_key") == work.key}
        self.index = {"schema_version": SCHEMA_VERSION, "kind": KIND, **header, "entries": kept,
                         "rejected": rejected, "runs": self.index.get("runs", [])}
        self.commit()
        self.clean()

    def _load(self) -> dict | None:
        uri = storage.join(self.root, OUTPUT_INDEX)
        if not storage.is_file(uri, self.endpoint):
            return None
        index = json.loads(storage.read_bytes(uri, self.endpoint))
        if (index.get("kind"), index.get("schema_version")) != (KIND, SCHEMA_VERSION):
            raise OutputError(f"{storage.public_uri(uri)} is not a translation output index of schema "
                              f"{SCHEMA_VERSION}: choose another --output")
        return index

    def _refuse_foreign(self) -> dict:
        """A folder without our output index must be empty: the clean-up would remove files in it."""
        files = visible_files(self.root, self.endpoint)
        if files:
            raise OutputError(f"--output {storage.public_uri(self.root)} holds {len(files)} files (e.g. "
                              f"{files[0]}) but no {OUTPUT_INDEX}: it is not a translation output; choose an "
                              "empty or new folder")
        return {}

    def clean(self) -> list[str]:
        """Remove output and temp files that the output index does not list (a killed run's leftovers,
        outputs of dropped entries); returns them."""
        listed = {e["file"] for e in self.entries.values()}
        stray = [f for f in storage.list_files(self.root, self.endpoint)
                 if f != OUTPUT_INDEX and f not in listed
                 and (f.lower().endswith(OUTPUT_SUFFIXES) or data.TEMP_NAME.search(f))]
        for rel in stray:
            storage.remove(storage.join(self.root, rel), self.endpoint)
        if stray:
            log.info("removed %d unlisted files from %s", len(stray), storage.public_uri(self.root))
        return stray

    def add(self, entries: list[dict], job_key: str) -> None:
        for entry in entries:
            if entry["status"] == "ok":
                self.entries[entry["key"]] = {k: v for k, v in entry.items() if k not in ("key", "status")}
            else:  # by content; an input that could not be read has none, so by its path
                reason = {"input_id": entry["input_id"], "reason": entry["reason"], "job_key": job_key}
                self.rejected[entry["input_sha256"] or unreadable_key(entry["input_id"])] = reason

    def commit(self, every_s: float = 0.0) -> None:
        """Replace the output index atomically (at most once per `every_s` seconds)."""
        if time.monotonic() - self.last_commit < every_s:
            return
        self._check_claim()
        blob = json.dumps(self.index, indent=1, sort_keys=True).encode()
        storage.write_bytes(storage.join(self.root, OUTPUT_INDEX), blob, self.endpoint)
        self.last_commit = time.monotonic()

    def _run_file(self) -> str:
        return storage.join(self.root, RUN_FILE)

    def _check_claim(self) -> None:
        """Stop when a later run has claimed the folder: two writers would drop each other's entries
        and clean each other's fresh files. (Schedules should not overlap; this catches it if they do.)"""
        claim = json.loads(storage.read_bytes(self._run_file(), self.endpoint))
        if claim["token"] != self.token:
            who = f"host {claim['host']}, pid {claim['pid']}, started {claim['started']}"
            raise OutputError(f"another run ({who}) took over --output {storage.public_uri(self.root)}; "
                              "this run stops")

    def record_run(self, record: dict) -> None:
        self.index["runs"] = (self.index.get("runs", []) + [record])[-KEPT_RUNS:]
        self.commit()
        self.clean()  # Parquet shards whose every row was redone


def unreadable_key(input_id: str) -> str:
    """The rejected-inputs key of an input that could not be read (no content to hash)."""
    return "unreadable:" + input_id


def load_output_index(root: str, endpoint: str | None = None) -> dict:
    """The output index of a translation output folder (FileNotFoundError if there is none)."""
    uri = storage.join(root, OUTPUT_INDEX)
    if not storage.is_file(uri, endpoint):
        raise FileNotFoundError(f"no {OUTPUT_INDEX} in {storage.public_uri(root)}: not a translation output")
    return json.loads(storage.read_bytes(uri, endpoint))


def read_parquet_outputs(root: str, endpoint: str | None = None) -> pa.Table:
    """The listed rows of a Parquet translation output (unlisted rows of old shards left out)."""
    entries = load_output_index(root, endpoint)["entries"]
    tables = []
    for shard in sorted({e["file"] for e in entries.values()}):
        fs, path = storage.arrow_filesystem(storage.join(root, shard), endpoint)
        tables.append(pq.read_table(path, filesystem=fs))
    if not tables:
        return OUTPUT_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    listed = pa.array(sorted(entries))
    return table.filter(pc.is_in(table["key"], value_set=listed))


def visible_files(root: str, endpoint: str | None) -> list[str]:
    return [f for f in storage.list_files(root, endpoint) if not f.split("/")[-1].startswith(".")]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
