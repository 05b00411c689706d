"""The local reader: batches of one split in this process, without Ray (tests, demo, evaluation)."""

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.augment import sample_keys, stack, to_float
from pipeline.data.manifest import read_manifest, shard_uris, split_counts
from pipeline.data.order import epoch_plan
from pipeline.data.spec import ReadSpec


class LocalReader:
    """Batches of one split without Ray: `{"a": N x C x H x W float32 in [-1, 1], "b": ...}`.

    aligned: a is the left half and b the right half of the same pairs, with the same crop and
    flip; unpaired / digits: a and b are independently shuffled (a split with one domain yields
    only that domain's key). `label_a` / `label_b` (int64) are added for domains whose every row
    has a label. What is read and how (sizes, flip, channels, seed, batches): see `ReadSpec`.

    The same spec, epoch, world_size and rank give the same batches, equal to Ray's
    `augmented_dataset`. Call `set_epoch(e)` (or pass epoch=) to reshuffle; `skip` samples of
    this rank's first epoch are already consumed (resume). The split's encoded images are held in
    memory: fine for the datasets here and the demo; Ray Data streams.
    """

    def __init__(self, spec: ReadSpec, *, epoch: int = 0, world_size: int = 1, rank: int = 0, skip: int = 0):
        self.spec = spec
        self.manifest = read_manifest(spec.data_path, spec.endpoint)
        self.skip = skip
        self.counts = split_counts(self.manifest, spec.split)
        self.epoch, self.world_size, self.rank = epoch, world_size, rank
        self.augment = spec.augment(self.manifest, epoch)
        self.tables = {d: _read_table(self.manifest, spec, d) for d in self.counts}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch
        self.augment = replace(self.augment, epoch=epoch)

    def __len__(self) -> int:
        steps = max(self.counts.values()) // self.world_size
        size = self.spec.batch_size
        return steps // size if self.spec.drop_last else -(-steps // size)

    def __iter__(self) -> Iterator[dict]:
        import torch  # only the tensor hand-off needs torch; ingest does not

        positions, plan = epoch_plan(self.counts, self.spec.seed, self.epoch, self.world_size, self.rank)
        size = self.spec.batch_size
        for start in range(self.skip, len(self) * size, size):
            stop = start + size
            batch = {}
            for domain, table in self.tables.items():
                rows = plan[domain][start:stop]
                samples = [
                    self.augment.sample(domain, table["image"][r], p)
                    for r, p in zip(rows, positions[start:stop], strict=True)
                ]
                where = f"{self.spec.split}/{domain}"
                for k, key in enumerate(sample_keys(domain)):
                    batch[key] = torch.from_numpy(stack([s[k] for s in samples], where))
                if domain != "ab" and self.manifest["domains"][domain]["labelled"]:
                    batch[f"label_{domain}"] = torch.from_numpy(table["label"][rows])
            yield to_float(batch)


def _read_table(manifest: dict, spec: ReadSpec, domain: str) -> dict:
    """{"image": list of bytes, "label": int64 array or None} of one split/domain, in index order."""
    table = read_split_table(manifest, spec, domain)
    labels = table["label"].to_numpy(zero_copy_only=False) if table["label"].null_count == 0 else None
    return {"image": table["image"].to_pylist(), "label": None if labels is None else labels.astype(np.int64)}


def read_split_table(manifest: dict, spec: ReadSpec, domain: str) -> pa.Table:
    """The `image` and `label` columns of one split/domain, row k = stored index k (both readers)."""
    tables = []
    for uri in shard_uris(manifest, spec.data_path, spec.split, domain):
        fs, path = storage.arrow_filesystem(uri, spec.endpoint)
        tables.append(pq.read_table(path, filesystem=fs, columns=["index", "image", "label"]))
    return pa.concat_tables(tables).sort_by("index").select(["image", "label"]).combine_chunks()
