"""The Ray Data reader, for Ray Train workers: the same samples as `LocalReader`, streamed.

The only module of `pipeline.data` that imports Ray, and only inside its functions, so that
ingest and the local reader never load it.
"""

import logging
import os
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

    The pipeline: read_parquet of the split's shards -> keep the rows `epoch_plan` gives this
    rank, tagged with their position -> sort by position (the epoch's shuffle; the split points
    are known, so no sampling) -> decode and augment each position's rows with `Augment` (a and b
    of one position always share a block).
    """
    manifest = read_manifest(spec.data_path, spec.endpoint)
    counts = split_counts(manifest, spec.split)
    augment = spec.augment(manifest, epoch)
    positions, plan = epoch_plan(counts, spec.seed, epoch, world_size, rank)
    if skip:  # resume mid-epoch: the remaining samples are unchanged (augmentation keys on position)
        positions, plan = positions[skip:], {d: rows[skip:] for d, rows in plan.items()}
        if not len(positions):
            raise ValueError(f"skip={skip} consumes the whole epoch of {skip} samples")
    labelled = [d for d in counts if d != "ab" and manifest["domains"][d]["labelled"]]
    columns = ["domain", "index", "image"] + (["label"] if labelled else [])
    ds = ray_dataset(spec.data_path, spec.split, columns=columns, endpoint=spec.endpoint)
    _small_sort_settings(ds.context)
    _progress_bars(ds.context)
    ds = ds.map_batches(
        _select_rows, batch_format="pyarrow", fn_kwargs={"plan": plan, "positions": positions}
    )
    ds = ds.sort("pos", boundaries=_sort_boundaries(manifest, spec.split, positions))
    ds = ds.map_batches(
        _augment_rows,
        batch_format="numpy",
        batch_size=None,
        fn_kwargs={"augment": augment, "domains": list(counts), "labelled": labelled},
    )
    return ds


def _progress_bars(context) -> None:
    """Ray Data's bars, printed where the data is read (a Ray Train worker, forwarded to the driver
    a line per refresh: thousands per run) and its INFO lines, only when the job runs with --verbose
    (pipeline.launch.quiet sets RAY_DATA_DISABLE_PROGRESS_BARS=1 otherwise, in every worker's env)."""
    shown = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    context.enable_progress_bars = shown
    context.enable_operator_progress_bars = shown
    if not shown:  # and its INFO lines at each epoch's execution (plan, start, "bars disabled")
        logging.getLogger("ray.data").setLevel(logging.WARNING)


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
            for key, pixels in zip(sample_keys(domain), sample, strict=True):
                out.setdefault(key, []).append(pixels)
            if domain in labelled:
                out.setdefault(f"label_{domain}", []).append(int(batch["label"][rows[domain]]))
    return {
        key: stack(v, key) if not key.startswith("label_") else np.array(v, np.int64)
        for key, v in out.items()
    }


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
    return (to_float(b) for b in ds.iter_torch_batches(batch_size=spec.batch_size, drop_last=spec.drop_last))
