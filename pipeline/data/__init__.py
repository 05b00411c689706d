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

Row schema: see SCHEMA. `id` is `<split>/<path relative to SRC>`; `index` numbers the rows of
one split and domain in id order and is what the readers shuffle.

Reading: `LocalReader` (no Ray; tests, demo, evaluation) and `augmented_dataset` / `ray_batches`
(Ray Data, for Ray Train workers) take one `ReadSpec` and produce the same batches for the same
spec, epoch, world size and rank; `choose_reader` picks one for training (data.reader=auto).
See `epoch_plan` for the order and `Augment` for the per-sample randomness.

Modules, in import order: `manifest` (on-disk format), `sources` (finding the inputs), `ingest`
(writing shards and the manifest), `order` (epoch order), `augment` (per-sample augmentation),
`spec` (ReadSpec), `local` (LocalReader) and `ray_reader` (the only one that imports Ray, lazily).
"""

from pipeline.data.augment import Augment, to_float
from pipeline.data.ingest import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS, IngestOptions, StrictRejects, ingest
from pipeline.data.local import LocalReader
from pipeline.data.manifest import (
    ARRAY_PADDING,
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    SHARD_NAME,
    TEMP_NAME,
    check_current,
    content_hash,
    read_manifest,
    sha256,
    shard_uris,
    split_counts,
)
from pipeline.data.order import epoch_plan
from pipeline.data.ray_reader import augmented_dataset, ray_batches, ray_dataset
from pipeline.data.sources import (
    LAYOUTS,
    PROBE_FILES,
    VAL_FRACTION,
    IngestError,
    Item,
    carve_val,
    detect_layout,
    discover,
    domain_channels,
    parse_labels,
)
from pipeline.data.spec import AUTO_LOCAL_BYTES, ReadSpec, choose_reader

__all__ = [
    "ARRAY_PADDING", "AUTO_LOCAL_BYTES", "DEFAULT_SHARD_BYTES", "DEFAULT_SHARD_ROWS", "LAYOUTS", "MANIFEST",
    "PROBE_FILES", "SCHEMA", "SCHEMA_VERSION", "SHARD_NAME", "TEMP_NAME", "VAL_FRACTION", "Augment",
    "IngestError", "IngestOptions", "Item", "LocalReader", "ReadSpec", "StrictRejects", "augmented_dataset",
    "carve_val", "check_current", "choose_reader", "content_hash", "detect_layout", "discover",
    "domain_channels", "epoch_plan", "ingest", "parse_labels", "ray_batches", "ray_dataset", "read_manifest",
    "sha256", "shard_uris", "split_counts", "to_float",
]  # fmt: skip
