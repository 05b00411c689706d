"""Planning: `resolve` completes the job from its input before the output folder is opened (so
the key the output index is filtered by is final), and `plan` lists the inputs, hashes them and keeps
the (input, sample) pairs the output index does not list yet."""

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from PIL import Image

from pipeline import data, images, storage
from pipeline.generator_artifact import GeneratorArtifact
from pipeline.translate.job import Job, Task, Work, entry_key
from pipeline.translate.outputs import KIND, unreadable_key, visible_files

HASH_THREADS = 16  # hashing folder inputs waits on reads (S3), not on the CPU


@dataclass
class Source:
    """Where the inputs are: a Parquet dataset (has prepare_data's _manifest.json) or a folder."""

    data_path: str | None  # a dataset or a folder of images; None: a generator from z needs no inputs
    splits: tuple[str, ...] = ()  # dataset: which splits (all when empty)
    endpoint: str | None = None

    def kind(self) -> str:
        if self.data_path is None:
            return "none"
        where, index = storage.public_uri(self.data_path), storage.join(self.data_path, data.MANIFEST)
        if storage.is_file(index, self.endpoint):
            manifest = json.loads(storage.read_bytes(index, self.endpoint))
            if manifest.get("kind") != KIND:
                return "parquet"
            if manifest.get("format") == "parquet":  # our own output: its images are in shards
                raise ValueError(f"--input {where} is a Parquet translation output; "
                                 "translate from PNG/JPEG outputs or a prepare_data.py dataset instead")
            return "folder"  # our own PNG/JPEG output: a folder of images (translating back, chaining)
        path = self.data_path
        if not storage.exists(path, self.endpoint) or storage.is_file(path, self.endpoint):
            raise FileNotFoundError(f"--input {where} is not a folder of images or a "
                                    "dataset made by prepare_data.py (no such folder)")
        return "folder"


def resolve(job: Job, source: Source) -> Work:
    """The job made complete before its output folder is opened: on an aligned dataset, or a folder
    of pair images, the half of each input the model reads is part of what the outputs depend on
    (and so of the key)."""
    kind = source.kind()
    if kind == "parquet":
        if job.half:
            raise ValueError("--half is for a folder of pair images; a dataset records its own layout")
        manifest = data.read_manifest(source.data_path, source.endpoint)
        half = source_domain(manifest, job.generator, source.data_path)[1]
        return Work(job, half, half and f"the {half} half of each aligned row, as the model was trained")
    if kind == "folder":
        return Work(job, *folder_half(job, source))
    return Work(job)


PAIR_SAMPLE = 8  # images whose size decides whether a folder holds pairs (the first, sorted)
HALVES = {"a": "left", "b": "right"}


def folder_half(job: Job, source: Source) -> tuple[str | None, str]:
    """(half, why) for a folder: pair images (width = 2 x height, A|B side by side as pix2pix's
    datasets) are cut to the half the model reads (`--half`, else the half its aligned training
    rows gave it); a model that does not record aligned training refuses them rather than
    translating the whole composite squeezed into its square."""
    sizes = sample_sizes(source)
    pairs = bool(sizes) and all(w == 2 * h for w, h in sizes)
    example = f"{sizes[0][0]}x{sizes[0][1]}" if sizes else ""
    if job.half == "whole" or (not pairs and job.half is None):
        return None, "whole images" + (" (--half whole)" if job.half else "")
    if not pairs:
        where = storage.public_uri(source.data_path)
        raise ValueError(f"--half {job.half}: the images of --input {where} are "
                         f"not pairs (width = 2 x height; e.g. {example}); drop --half")
    if job.half:
        return HALVES[job.half], f"the {HALVES[job.half]} half of each {example} pair (--half {job.half})"
    generator = job.generator
    if generator.aligned:
        half = generator.reads_half()
        return half, f"the {half} half of each {example} pair, as the model was trained on aligned pairs"
    raise ValueError(
        f"--input {storage.public_uri(source.data_path)} holds pair images ({example}: width = 2 x height, "
        f"A|B side by side) and model {job.info.name} does not record training on such pairs: pass "
        "--half a (the left half), --half b (the right half) or --half whole (the whole image)")


def sample_sizes(source: Source) -> list[tuple[int, int]]:
    """(width, height) of the folder's first PAIR_SAMPLE readable images (headers only)."""
    files = [f for f in visible_files(source.data_path, source.endpoint) if images.is_image_name(f)]
    sizes = []
    for name in sorted(files)[:PAIR_SAMPLE]:
        uri = storage.join(source.data_path, name)
        if special_file(uri):  # a fifo named like an image would block this read for ever
            continue
        try:
            blob = storage.read_bytes(uri, source.endpoint)
            with Image.open(io.BytesIO(blob)) as img:
                sizes.append(img.size)
        except Exception:  # noqa: BLE001 - only a probe: the worker rejects an unreadable input with its reason
            continue
    return sizes


@dataclass
class Plan:
    tasks: dict  # id -> Task
    outputs: int  # (input, sample) pairs to translate
    counts: dict  # inputs, done (skipped), duplicates, ignored files
    shards: list[str] = field(default_factory=list)  # dataset: the shards to read


def plan(work: Work, source: Source, done: dict, rejected: dict | None = None, pairs: int = 0) -> Plan:
    """The inputs and samples that `done` (the output index's entries) does not list yet, leaving out
    inputs `rejected` before (by sha256)."""
    kind = source.kind()
    shards, ignored = [], []
    if kind == "none":
        inputs = [(f"pair-{i:06d}", None, None) for i in range(pairs)]
    elif kind == "folder":
        inputs, ignored = _folder_inputs(source)
    else:
        inputs, shards = _dataset_inputs(source, work.job.generator)
    unique, duplicates = _unique(inputs)
    rejected = rejected or {}
    before = [i for i in unique if _rejected_before(i, rejected)]
    unique = [i for i in unique if not _rejected_before(i, rejected)]
    taken = {e["name"]: key.rpartition("/")[0] for key, e in done.items()}
    names = output_names([i for i, _, _ in unique], taken, {i: s for i, s, _ in unique})
    tasks, skipped, samples = {}, 0, work.job.samples
    for input_id, sha, uri in unique:
        todo = [k for k in range(samples) if entry_key(sha or input_id, k) not in done]
        skipped += samples - len(todo)
        if todo:
            tasks[input_id] = Task(input_id, sha, names[input_id], todo, uri)
    counts = {"inputs": len(unique) + len(before), "done_before": skipped, "rejected_before": len(before),
              "duplicates": duplicates, "ignored": ignored}
    return Plan(tasks, sum(len(t.samples) for t in tasks.values()), counts, shards)


def _rejected_before(item: tuple, rejected: dict) -> bool:
    """Rejected by an earlier run: its content (sha256), or, still unreadable, its path; an input
    readable again has a sha256 and is tried."""
    input_id, sha, _ = item
    return (sha if sha is not None else unreadable_key(input_id)) in rejected


def _folder_inputs(source: Source) -> tuple[list[tuple], list[str]]:
    """(id, sha256, uri) of every image in the folder, hashed on a thread pool; other files ignored."""
    files = visible_files(source.data_path, source.endpoint)
    wanted = [f for f in files if images.is_image_name(f)]
    uris = [storage.join(source.data_path, f) for f in wanted]

    def digest(uri: str) -> str | None:
        if special_file(uri):  # unreadable: BatchTranslator reports it per item
            return None
        try:
            return data.sha256(storage.read_bytes(uri, source.endpoint))
        except OSError:  # unreadable now: BatchTranslator reports it per item
            return None

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        shas = list(pool.map(digest, uris))
    return list(zip(wanted, shas, uris, strict=True)), [f for f in files if f not in set(wanted)]


def special_file(uri: str) -> bool:
    """A local name that is there but no regular file (a fifo, socket or device named like an
    image): reading it could block for ever, so it is never opened."""
    return not storage.is_s3(uri) and os.path.exists(uri) and not os.path.isfile(uri)


def _dataset_inputs(source: Source, generator: GeneratorArtifact) -> tuple[list[tuple], list[str]]:
    manifest = data.read_manifest(source.data_path, source.endpoint)
    domain, _ = source_domain(manifest, generator, source.data_path)
    splits = list(source.splits) or sorted(s for s, counts in manifest["counts"].items() if domain in counts)
    shards = []
    for split in splits:
        if domain not in data.split_counts(manifest, split):
            where = storage.public_uri(source.data_path)
            raise ValueError(f"split {split!r} of {where} has no domain {domain!r}")
        shards += data.shard_uris(manifest, source.data_path, split, domain)
    inputs = []
    for uri in shards:
        fs, path = storage.arrow_filesystem(uri, source.endpoint)
        table = pq.read_table(path, filesystem=fs, columns=["id", "sha256"])
        ids, shas = table["id"].to_pylist(), table["sha256"].to_pylist()
        inputs += [(i, s, None) for i, s in zip(ids, shas, strict=True)]
    return inputs, shards


def source_domain(manifest: dict, generator: GeneratorArtifact, uri: str = "") -> tuple[str, str | None]:
    """(stored domain, half) the generator reads: aligned rows hold a|b side by side
    (`GeneratorArtifact.reads_half`); otherwise its input domain."""
    domains = manifest["domains"]
    direction = generator.direction
    if "ab" in domains:
        return "ab", generator.reads_half()
    domain = direction[0]
    if domain not in domains:
        raise ValueError(f"dataset {storage.public_uri(uri)} has domains {sorted(domains)}, none is the "
                         f"input domain {domain!r} of direction {direction!r}")
    return domain, None


def _unique(inputs: list[tuple]) -> tuple[list[tuple], int]:
    """One input per content (the first id in sorted order keeps it); unreadable ones kept."""
    seen, unique = set(), []
    for input_id, sha, uri in sorted(inputs, key=lambda i: i[0]):
        if sha is not None and sha in seen:
            continue
        seen.add(sha)
        unique.append((input_id, sha, uri))
    return unique, len(inputs) - len(unique)


def output_names(ids: list[str], taken: dict[str, str], shas: dict[str, str | None]) -> dict[str, str]:
    """id -> output path without suffix: the id without its extension ("sub/cat.jpg" -> "sub/cat");
    ids that would share a name keep their extension ("cat_jpg", "cat_png"); a name an earlier
    output of other content holds gets the input's hash ("cat-1f2e3d4c")."""
    stems = {i: os.path.splitext(i)[0] for i in ids}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    names = {}
    for i, stem in stems.items():
        name = stem if counts[stem] == 1 else stem + "_" + os.path.splitext(i)[1].lstrip(".").lower()
        identity = shas[i] or i
        if taken.get(name, identity) != identity:
            name = f"{name}-{identity[:8]}"
        names[i] = name
    return names
