"""The configuration of one training run: model, data, schedule, scaling, evaluation, tracking.

Every section is a typed dataclass, so `--set optim.lr=1e-4 model.norm=batch_renorm
scaling.num_workers=2` (CLI) and Ray Tune search spaces go through the same checked override
path (`pipeline.config`). The whole RunConfig travels as JSON in every checkpoint and MLflow run.

Paths: `home` holds the embedded defaults (MLflow store, checkpoints, ingested data, caches).
It is resolved to an absolute path once, in the driver, so that `ray job submit --working-dir .`
(which runs the entry point in an unpacked copy of the repo) still writes to the user's store.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from models import MODELS
from pipeline.config import ConfigError, apply_overrides, check_values, checked, flatten, from_dict, to_dict

DEFAULT_HOME = os.path.join(os.path.expanduser("~"), ".transmute")


@dataclass
class DataSettings:
    path: str = ""  # Parquet dataset made by prepare_data.py (local or s3://); "" = <home>/data/<dataset>
    dataset: str = ""  # known dataset name (facades, weizmann_horse, mnist2mnistm, digits)
    source: str = ""  # raw folder to ingest from when `path` holds no dataset; "" = the known source
    load_size: int = checked(0)  # resize to this before cropping; 0 = as stored
    crop_size: int = checked(0)  # random crop fed to the nets; 0 = the whole (resized) image
    flip: bool = True
    swap_ab: bool = False  # aligned data: translate the right half to the left (pix2pix's BtoA)
    # auto (local below pipeline.data.AUTO_LOCAL_BYTES of training split, else ray; logged as the
    # params data.reader_used / data.reader_reason) | ray (Ray Data tasks decode for each worker) |
    # local (in-process, no Ray)
    reader: str = checked("auto", choices=("auto", "ray", "local"))
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class TrainSettings:
    steps: int = checked(1000, min=1)  # generator updates
    batch_size: int = checked(1, min=1)  # PER WORKER: the global batch is batch_size × scaling.num_workers
    seed: int = 0
    log_every: int = checked(10, min=1)  # average step losses over this many steps, then log them
    max_minutes: float = 0.0  # > 0: fit the whole run in this wall time; `steps` is then chosen (budget.py)
    started_at: float = 0.0  # epoch seconds the budget counts from (the driver's start); 0 = the loop's


@dataclass
class OptimSettings:
    lr: float | None = None  # None = the model's paper rate (its module's LR), filled in by RunConfig
    # fraction of steps at constant lr; then linear decay to 0 (CycleGAN)
    decay_from: float = checked(0.5, max=1)


@dataclass
class RenormSettings:
    """Batch Renorm's limits and their warm-up (used when the nets contain BatchRenorm2d layers).

    Ioffe 2017 trains with plain batch norm (rmax = 1, dmax = 0) for the first 5k steps, then
    relaxes the limits to reach rmax = 3 at 40k steps and dmax = 5 at 25k. The paper gives steps;
    here the points are fractions of train.steps by default, the paper's read as a 100k-step run
    (our choice): batch norm until 5%, dmax at its end from 25%, rmax from 40% of the run.
    `warmup_steps > 0` sets the points in steps instead: rmax reaches its end at warmup_steps,
    the batch-norm phase ends at 5/40 and dmax at 25/40 of it (the paper's proportions).
    No warm-up (the final limits from step 0): warmup_steps 0 and all three fractions 0.
    """

    rmax: float = checked(3.0, min=1)  # 1: plain batch norm
    dmax: float = 5.0
    bn_until: float = 0.05  # fraction of train.steps trained as plain batch norm
    dmax_until: float = 0.25  # fraction of train.steps at which dmax reaches `dmax`
    rmax_until: float = 0.40  # fraction of train.steps at which rmax reaches `rmax`
    warmup_steps: int = 0  # > 0: rmax reaches `rmax` at this step, the rest in proportion; 0 = fractions


@dataclass
class ScalingSettings:
    num_workers: int = checked(1, min=1)
    use_gpu: bool = False
    cpus_per_worker: float = checked(1.0, above=0)
    max_failures: int = 2  # worker failures to recover from (from the latest checkpoint)
    bf16: bool = True  # autocast to bfloat16 (GPU only)
    channels_last: bool = True  # GPU only
    compile: bool = False  # torch.compile each net


@dataclass
class CheckpointSettings:
    every: int = 500  # steps; a checkpoint is also written at the end
    keep: int = checked(2, min=1)  # newest checkpoints kept in storage


@dataclass
class EvalSettings:
    every: int = 500  # steps between validation evaluations (0 = only at the end)
    max_images: int = checked(64, min=1)
    grid_rows: int = checked(4, min=1)  # rows (images) of the logged sample grids
    # domain holding label maps (photo→labels scores); "" = none
    label_domain: str = checked("b", choices=("a", "b", ""))
    num_classes: int = 0  # label palette size (facades 12, weizmann_horse 2)
    train_mode_too: bool = False  # also evaluate in train mode (seed 000's norm gap)
    inception_path: str = ""  # TorchScript Inception on disk for FID/KID; "" = skip


@dataclass
class TrackingSettings:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db
    experiment: str = "transmute"
    run_name: str = ""  # "" = model-dataset-key settings
    run_id: str = ""  # set by the driver; workers reattach to it after a restart
    parent_run_id: str = ""  # a Tune search's parent run
    log_models: bool = True  # log the final generators as MLflow models (searches turn this off)
    register: bool = True  # register the final generators in the model registry
    registered_name: str = ""  # "" = <recipe>; each generator registers as <name>-<direction>


@dataclass
class StorageSettings:
    path: str = ""  # checkpoints and Ray Train state; "" = <home>/runs; s3://bucket/prefix works
    endpoint: str = ""  # S3-compatible endpoint URL for every s3:// path (data, checkpoints, searches);
    # "" = the AWS environment's (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), else AWS itself


@dataclass
class RunConfig:
    recipe: str = ""
    model_name: str = checked("cyclegan", choices=tuple(MODELS))
    model: Any = None  # MODELS[model_name].Config
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    renorm: RenormSettings = field(default_factory=RenormSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    home: str = ""  # "" = $TRANSMUTE_HOME or ~/.transmute

    def __post_init__(self):
        if self.model is None:
            self.model = MODELS[self.model_name].Config()
        if self.optim.lr is None:  # a number from here on: params and checkpoints record the rate used
            self.optim = dataclasses.replace(self.optim, lr=MODELS[self.model_name].lr)


def image_size(cfg: RunConfig) -> int | None:
    """The run's training image size: the crop, else the load size (None: the images' own)."""
    return cfg.data.crop_size or cfg.data.load_size or None


def make_config(model_name: str, **sections) -> RunConfig:
    return RunConfig(model_name=model_name, model=MODELS[model_name].Config(), **sections)


def override(cfg: RunConfig, overrides) -> RunConfig:
    """Apply `key=value` strings or a {key: value} dict; the model itself is fixed by the recipe."""
    items = overrides if isinstance(overrides, dict) else dict(_pair(o) for o in overrides)
    items = upgrade_keys(items)
    if "model_name" in items and items["model_name"] != cfg.model_name:
        raise ConfigError("model_name is fixed by the recipe; pick another recipe (--recipe) instead")
    cfg = apply_overrides(cfg, items)
    validate(cfg)
    return cfg


def _pair(text):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-4)")
    return key.strip(), value.strip()


def validate(cfg: RunConfig) -> None:
    """Every field within the values it declares (`checked`; numbers finite and >= 0 unless declared
    otherwise), the model's included, then the rules that tie fields together."""
    check_values(cfg)
    r = cfg.renorm
    if not r.bn_until <= min(r.rmax_until, r.dmax_until):
        raise ConfigError(f"renorm.bn_until={r.bn_until:g} is not allowed: it must not come after "
                          f"renorm.rmax_until ({r.rmax_until:g}) or renorm.dmax_until ({r.dmax_until:g})")


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make home, data and storage absolute (the driver calls this before anything ships)."""
    home = os.path.abspath(os.path.expanduser(cfg.home or os.environ.get("TRANSMUTE_HOME", DEFAULT_HOME)))
    data_path = cfg.data.path or os.path.join(home, "data", cfg.data.dataset or cfg.recipe)
    storage = cfg.storage.path or os.path.join(home, "runs")
    return dataclasses.replace(
        cfg,
        home=home,
        data=dataclasses.replace(cfg.data, path=_absolute(data_path)),
        storage=dataclasses.replace(cfg.storage, path=_absolute(storage)),
    )


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def to_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(text_or_dict, source: str = "") -> RunConfig:
    """The RunConfig of a JSON text or dict; ConfigError naming `source` (its file) when it is not one."""
    where = f"{source}: " if source else ""
    try:
        data = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    except ValueError as e:
        raise ConfigError(f"{where}not valid JSON ({e})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{where}a run config must be a JSON object {{key: value}}, not a JSON {kind}")
    name = data.get("model_name", "cyclegan")
    if name not in MODELS:
        raise ConfigError(f"{where}model_name={name!r} is not allowed: one of {', '.join(map(repr, MODELS))}")
    base = make_config(name)
    return from_dict(base, upgrade_keys(flatten(data)))


def model_config(model_name: str, data: dict):
    """The model's Config from its dict (a logged generator's generator.json). `lr`, which model
    configs held before the rate moved to optim.lr, is dropped: using a generator needs no rate."""
    return from_dict(MODELS[model_name].Config, {k: v for k, v in data.items() if k != "lr"})


def flat_params(cfg: RunConfig) -> dict:
    """{dotted key: value} for MLflow params and Tune spaces, URIs without credentials."""
    return flatten(public_config(cfg))


def public_config(cfg: RunConfig) -> RunConfig:
    """The config as it may be logged, printed or stored (MLflow params, a checkpoint's config.json):
    every URI in it without user:password@ or secret query parameters (`storage.public_uri`)."""
    from pipeline.storage import public_uri

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, path=public_uri(cfg.data.path),
                                 source=public_uri(cfg.data.source)),
        storage=dataclasses.replace(cfg.storage, path=public_uri(cfg.storage.path),
                                    endpoint=public_uri(cfg.storage.endpoint)),
        tracking=dataclasses.replace(cfg.tracking, uri=public_uri(cfg.tracking.uri)),
    )


# Keys that moved, old name -> new name. Files written before the move (checkpoints' config.json,
# best_config.json, MLflow params) and `--set` with an old name are read into the new key.
MOVED = {"model.lr": "optim.lr", "data.s3_endpoint": "storage.endpoint", "eval.samples": "eval.grid_rows"}
_noted = set()  # old keys already noted in this process


def upgrade_keys(items: dict) -> dict:
    """Flat `items` with moved keys under their new names. Where both are given the new one wins
    when set: an old file holds model.lr (the model's rate) beside optim.lr (None, or the run's
    rate, which was the one used)."""
    items = dict(items)
    for old, new in MOVED.items():
        if old not in items:
            continue
        value = items.pop(old)
        if old not in _noted:
            _noted.add(old)
            print(f"note: config key {old} is now {new}; reading it as {new}", file=sys.stderr)
        if _unset(items.get(new)):
            items[new] = value
    return items


def _unset(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))
