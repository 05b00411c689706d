"""The Ray Data reader, for Ray Train workers: the same samples as `LocalReader`, streamed.

The only module of `pipeline.data` that imports Ray, and only inside its functions, so that
ingest and the local reader never load it.
"""

import logging
import os
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.data.augment import Augment, sample_keys, stack, to_float
from pipeline.data.manifest import read_manifest, shard_uris, split_counts
from pipeline.data.order import epoch_plan
from pipeline.data.spec import ReadSpec


def ray_dataset(
    data_path: str,
    split: str,
    domain: str | None = None,
    columns: list[str] | None = None,
    endpoint: str | None = None,
):
    """The raw rows (SCHEMA) of one split, optionally one domain, as a Ray Dataset: only the shards
    the manifest lists. For batch translation: map_batches over `image` with images.decode."""
    import ray.data

    manifest = read_manifest(data_path, endpoint)
    domains = [domain] if domain else list(split_counts(manifest, split))
    uris = [u for d in domains for u in shard_uris(manifest, data_path, split, d)]
    if not uris:
        raise KeyError(f"no shards for split {split!r} domain {domain!r} in {storage.public_uri(data_path)}")
    fs, _ = storage.arrow_filesystem(data_path, endpoint)
    paths = [storage.arrow_filesystem(u, endpoint)[1] for u in uris]
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=None)
    return ds.select_columns(columns) if columns else ds


def augmented_dataset(spec: ReadSpec, *, epoch: int = 0, world_size: int = 1, rank: int = 0, skip: int = 0):
    """This rank's samples for one epoch, decoded and augmented, in epoch order, as a Ray Dataset with
    columns a, b (uint8 H x W x C: a quarter of float32's bytes through the object store) and
    label_a / label_b where labelled. `to_float` on its torch batches gives float32 in [-1, 1],
    row for row equal to LocalReader with the same arguments (`ray_batches` does both). Samples,
    not batches: the spec's batch_size and drop_last are the caller's to apply.

    The plan is made here, not by Ray: the split's encoded rows are read once per process and
    Ray cluster and put in the object store (`_stored_split`; workers read them zero-copy), and
    `epoch_plan` says which row each position takes. The dataset is then a list of position
    blocks, each decoded and augmented by one task (`_augment_block`), in order. So an epoch
    costs no read, sort or shuffle, only the start of a streaming execution (measured by
    `benchmarks/readers.py`). Like LocalReader, the split's encoded bytes are held in memory
    (here in the object store, once per node).
    """
    import ray.data

    manifest, tables = _stored_split(spec)
    counts = split_counts(manifest, spec.split)
    augment = spec.augment(manifest, epoch)
    positions, plan = epoch_plan(counts, spec.seed, epoch, world_size, rank)
    if skip:  # resume mid-epoch: the remaining samples are unchanged (augmentation keys on position)
        positions, plan = positions[skip:], {d: rows[skip:] for d, rows in plan.items()}
        if not len(positions):
            raise ValueError(f"skip={skip} consumes the whole epoch of {skip} samples")
    labelled = [d for d in counts if d != "ab" and manifest["domains"][d]["labelled"]]
    size = _block_positions(tables, augment, len(positions), spec.batch_size)
    blocks = [{"start": start} for start in range(0, len(positions), size)]
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    ds.context.execution_options.preserve_order = True  # epoch order is part of determinism
    _progress_bars(ds.context)
    return ds.map_batches(
        _augment_block,
        batch_size=1,
        fn_kwargs={"tables": tables, "positions": positions, "plan": plan, "size": size,
                   "augment": augment, "labelled": labelled},
    )  # fmt: skip


def _progress_bars(context) -> None:
    """Ray Data's bars, printed where the data is read (a Ray Train worker, forwarded to the driver
    a line per refresh: thousands per run) and its INFO lines, only when the job runs with --verbose
    (pipeline.launch.quiet sets RAY_DATA_DISABLE_PROGRESS_BARS=1 otherwise, in every worker's env)."""
    shown = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    context.enable_progress_bars = shown
    context.enable_operator_progress_bars = shown
    if not shown:  # and its INFO lines at each epoch's execution (plan, start, "bars disabled")
        logging.getLogger("ray.data").setLevel(logging.WARNING)


_STORED: dict = {}  # (cluster, data path, split, content hash) -> (manifest, {domain: ObjectRef})


def _stored_split(spec: ReadSpec) -> tuple[dict, dict]:
    """The manifest and the split's {domain: ObjectRef of its (image, label) table}, read and put
    once per process and Ray cluster: every epoch after the first reuses them."""
    import ray

    from pipeline.data.local import read_split_table

    manifest = read_manifest(spec.data_path, spec.endpoint)
    cluster = ray.get_runtime_context().gcs_address
    key = (cluster, spec.data_path, spec.endpoint, spec.split, manifest["content_hash"])
    if key not in _STORED:
        for old in [k for k in _STORED if k[0] != cluster]:  # refs of a cluster that is gone
            del _STORED[old]
        refs = {d: ray.put(read_split_table(manifest, spec, d)) for d in split_counts(manifest, spec.split)}
        _STORED[key] = (manifest, refs)
    return _STORED[key]


def _block_positions(tables: dict, augment: Augment, positions: int, batch_size: int) -> int:
    """Positions per task: about 8 MiB of decoded samples (a few tasks per epoch amortise Ray's
    per-task cost; blocks small enough that the first batch comes soon), 16 to 1024, rounded to
    whole batches so that no batch spans two blocks (Ray would copy it together)."""
    import ray

    sample = 0
    for domain, ref in tables.items():  # one decoded sample of each domain gives the block's bytes
        image = ray.get(ref)["image"][0].as_py()
        sample += sum(p.nbytes for p in augment.sample(domain, image, 0))
    size = int(np.clip(8 * 2**20 // max(sample, 1), 16, 1024))
    return max(batch_size, size - size % batch_size)


def _augment_block(batch: dict, tables: dict, positions: np.ndarray, plan: dict, size: int,
                   augment: Augment, labelled: list[str]) -> dict:  # fmt: skip
    """The decoded, augmented samples of one block of positions, every domain's in one row."""
    import ray

    out = {}
    for start in batch["start"].tolist():
        where = slice(start, start + size)
        for domain, ref in tables.items():
            table = ray.get(ref)  # zero-copy from the object store
            rows, images = plan[domain][where], table["image"]
            samples = [augment.sample(domain, images[int(r)].as_py(), p)
                       for r, p in zip(rows, positions[where], strict=True)]  # fmt: skip
            for k, key in enumerate(sample_keys(domain)):
                out.setdefault(key, []).append(stack([s[k] for s in samples], key))
            if domain in labelled:
                labels = table["label"].take(pa.array(rows)).to_numpy(zero_copy_only=False)
                out.setdefault(f"label_{domain}", []).append(labels.astype(np.int64))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def ray_batches(
    spec: ReadSpec, *, epoch: int = 0, world_size: int | None = None, rank: int | None = None, skip: int = 0
) -> Iterator[dict]:
    """Torch batches of this Ray Train worker's shard for one epoch (call once per epoch).

    world_size / rank default to the Ray Train context, so inside train_loop_per_worker
    `ray_batches(ReadSpec(data_path, "train", 4, crop_size=256, seed=cfg.seed, drop_last=True), epoch=e)`
    is enough. Each worker reads its own deterministic shard instead of `get_dataset_shard`, whose
    split depends on timing; drop_last=True keeps the step count equal on all workers.
    """
    if world_size is None or rank is None:
        import ray.train

        context = ray.train.get_context()
        world_size, rank = context.get_world_size(), context.get_world_rank()
    ds = augmented_dataset(spec, epoch=epoch, world_size=world_size, rank=rank, skip=skip)
    batches = ds.iter_batches(batch_size=spec.batch_size, batch_format="numpy", drop_last=spec.drop_last)
    return (_to_torch(b) for b in batches)


def _to_torch(batch: dict) -> dict:
    """A numpy batch as `to_float` torch tensors, cheaper than iter_torch_batches' collate: the
    uint8 images are taken from the object store without a copy (read-only buffers; to_float
    writes new tensors) and converted once; the small label arrays are copied."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        out = {k: torch.from_numpy(v) if v.dtype == np.uint8 else torch.tensor(v) for k, v in batch.items()}
    return to_float(out)
