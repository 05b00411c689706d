"""What a reader reads and how: one typed spec for both readers, built from the run's config."""

from dataclasses import dataclass

from pipeline.data.augment import Augment

# data.reader=auto reads a training split in-process (LocalReader) below this many stored bytes and
# with Ray Data above. Measured on 2 idle cores (benchmarks/readers.py, issue 15): Ray Data gives
# 0.24/0.37x of LocalReader's pairs per core and 0.38/0.65x per CPU-second on facades (20 MB) and
# mnist2mnistm (3 MB), with no crossover in that range: its decode tasks cost what LocalReader does
# per pair, but Ray Data's executor and iterator threads take about a quarter core in the consumer
# and Ray's own processes about a tenth, for as long as the epoch lasts. LocalReader holds the
# encoded split in each process's memory, so above this size Ray Data (one copy in the object store
# per node, spilled to disk when it is full).
AUTO_LOCAL_BYTES = 1 << 30


@dataclass(frozen=True)
class ReadSpec:
    """One split of the dataset at `data_path`, in batches of `batch_size`, augmented.

    load_size None uses the stored size (the ingest's --load-size if any); crop_size None keeps the
    whole (resized) image; flip=False and crop_size=None give un-augmented images for evaluation.
    `seed` fixes the epoch order and the augmentation. channels None keeps each domain as stored
    (MNIST 1, RGB 3); 3 replicates gray to RGB, 1 gives luma. drop_last drops an epoch's
    incomplete last batch (training: every rank then runs the same steps). The Ray Data
    `augmented_dataset` yields samples, not batches, so it ignores batch_size and drop_last.
    """

    data_path: str
    split: str
    batch_size: int = 1
    load_size: int | None = None
    crop_size: int | None = None
    flip: bool = True
    seed: int = 0
    channels: int | None = None
    drop_last: bool = False
    endpoint: str | None = None

    def __post_init__(self):
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be None (as stored), 1 or 3, got {self.channels!r}")

    @classmethod
    def from_config(cls, cfg, split: str | None = None, *, train: bool = True) -> "ReadSpec":
        """The reader settings of a RunConfig. train: `split` (default data.train_split) in training
        batches, augmented as configured, the incomplete last batch dropped. Otherwise `split`
        (default data.val_split) un-augmented at the size the nets see (the crop, else the load
        size), in batches of 1 unless replaced (dataclasses.replace), as evaluation reads it."""
        d, endpoint = cfg.data, cfg.storage.endpoint or None
        if train:
            return cls(d.path, split or d.train_split, cfg.train.batch_size, d.load_size or None,
                       d.crop_size or None, d.flip, cfg.train.seed, drop_last=True,
                       endpoint=endpoint)  # fmt: skip
        return cls(d.path, split or d.val_split, load_size=d.crop_size or d.load_size or None,
                   flip=False, seed=cfg.train.seed, endpoint=endpoint)  # fmt: skip

    def augment(self, manifest: dict, epoch: int) -> Augment:
        """The augmentation of one epoch; the load size and channels not given are as stored."""
        load = self.load_size or manifest.get("load_size")
        channels = {d: self.channels or info["channels"] for d, info in manifest["domains"].items()}
        return Augment(self.crop_size, load, self.flip, self.seed, epoch, channels)


def choose_reader(requested: str, manifest: dict | None, split: str) -> tuple[str, str]:
    """("local" | "ray", why) for data.reader `requested` ("auto", "local", "ray") and this split of
    the dataset (only "auto" needs its manifest)."""
    if requested != "auto":
        return requested, f"data.reader={requested}"
    stored = sum(s["bytes"] for s in manifest["shards"] if s["split"] == split)
    sizes = f"{stored / 2**20:.1f} MiB {{}} {AUTO_LOCAL_BYTES / 2**20:.1f} MiB"
    if stored < AUTO_LOCAL_BYTES:
        return "local", f"auto: split {split} is {sizes.format('<')}"
    return "ray", f"auto: split {split} is {sizes.format('>=')}"
