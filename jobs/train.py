"""Train a registered GAN on a Parquet dataset with Ray Train (1..N workers, CPU or GPU), tracked in MLflow.

    python jobs/train.py --recipe cyclegan_facades-quick
    python jobs/train.py --recipe dualgan_facades --set model.norm=batch_renorm scaling.num_workers=2
    ray job submit --working-dir . -- python jobs/train.py --recipe cyclegan_facades-quick

Embedded defaults: a local Ray (started if none is reachable), MLflow at sqlite:///<home>/mlflow.db,
checkpoints under <home>/runs, datasets under <home>/data, with home = $TRANSMUTE_HOME or
~/.transmute (made absolute here, so a job submitted with --working-dir writes to the same store).
`train.batch_size` is per worker. `--resume NAME` continues run NAME from its latest checkpoint,
in the same MLflow run.
"""

import argparse
import os
import subprocess
import sys
import time

STARTED = time.time()  # a --minutes budget counts from here, start-up included

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobs.recipes import RECIPES, recipe  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.run_config import RunConfig, override, resolve_paths, to_json  # noqa: E402

DATASETS = os.environ.get("TRANSMUTE_DATASETS", os.path.join(os.path.dirname(ROOT), "shared", "datasets"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--recipe", help=f"one of: {', '.join(sorted(RECIPES))}")
    p.add_argument(
        "--config", help="a RunConfig JSON file (e.g. a search's best_config.json) instead of a recipe"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. optim.lr=1e-4 model.norm=batch_renorm",
    )
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget from this command's start to its end: the run picks its number of "
                        "steps to fit (train.max_minutes)")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue this run from its latest checkpoint")
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="run the loop in this process (or under torchrun) without Ray; reader=local",
    )
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--metrics-json", metavar="FILE", help="also write the final metrics to FILE (JSON)")
    args = p.parse_args(argv)
    if bool(args.recipe) == bool(args.config):
        p.error("give exactly one of --recipe NAME or --config FILE")
    return args


def build_config(args) -> RunConfig:
    cfg = override(load_config_file(args.config) if args.config else recipe(args.recipe), args.set)
    if args.no_ray:
        cfg = override(cfg, {"data.reader": "local"})
    if args.minutes is not None:
        cfg = override(cfg, {"train.max_minutes": args.minutes})
    if cfg.train.max_minutes:  # this command's start, never one carried in a --config file
        cfg = override(cfg, {"train.started_at": STARTED})
    return resolve_paths(cfg)


def load_config_file(path: str) -> RunConfig:
    from pipeline.run_config import from_json

    try:
        with open(path) as f:
            return from_json(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: {e}") from None


# ----------------------------------------------------------------------------- data


def ensure_dataset(cfg: RunConfig) -> dict:
    """The dataset's manifest; ingests the recipe's known source on first use."""
    from pipeline.data import check_current, ingest, read_manifest

    endpoint = cfg.storage.endpoint or None
    try:
        manifest = read_manifest(cfg.data.path, endpoint)
    except FileNotFoundError:
        manifest = None
    if manifest is not None:
        try:
            check_current(manifest, storage.public_uri(cfg.data.path))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return manifest
    source = cfg.data.source or os.path.join(DATASETS, cfg.data.dataset)
    if not storage.exists(source, endpoint):
        command = f"python jobs/prepare_data.py SRC {cfg.data.path}"
        raise SystemExit(
            f"error: no dataset at {storage.public_uri(cfg.data.path)} and its source {source} is missing.\n"
            f"Ingest the {cfg.data.dataset or 'data'} images first:\n  {command}\n"
            f"(SRC: a folder or s3:// prefix of images; see README 'Preparing data'), or pass "
            f"--set data.path=... for an ingested dataset, or data.source=... to ingest from."
        )
    print(f"ingesting {source} into {storage.public_uri(cfg.data.path)} (first use of this dataset)")
    return ingest(source, cfg.data.path, endpoint=endpoint, progress=False)


# ----------------------------------------------------------------------------- names, resume, tracking


def run_name(cfg: RunConfig) -> str:
    m = cfg.model
    parts = [
        cfg.recipe or cfg.model_name,
        getattr(m, "norm", ""),
        f"w{cfg.scaling.num_workers}",
        time.strftime("%Y%m%d-%H%M%S"),
    ]
    return "-".join(p for p in parts if p)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or os.environ.get("TRANSMUTE_GIT_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TRANSMUTE_GIT_COMMIT", "unknown")


def previous_run(cfg: RunConfig, name: str) -> dict:
    """run_id and progress of an earlier run, from its newest checkpoint's meta.json (local or s3://;
    Ray Train then restores the same run folder from its own record of that checkpoint)."""
    from pipeline.checkpoint import latest_meta

    folder = storage.join(cfg.storage.path, name)
    meta = latest_meta(folder, cfg.storage.endpoint or None)
    if meta is None:
        raise SystemExit(f"error: --resume {name}: no complete checkpoint under {folder}")
    return meta


def start_tracking(cfg: RunConfig, manifest: dict) -> RunConfig:
    import dataclasses

    from pipeline.tracking import create_config_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri or None, cfg.home)
    tracking = dataclasses.replace(cfg.tracking, uri=uri)
    cfg = dataclasses.replace(cfg, tracking=tracking)
    if cfg.tracking.run_id:
        return cfg
    tags = {
        "model": cfg.model_name,
        "recipe": cfg.recipe,
        "dataset": cfg.data.dataset,
        "dataset.content_hash": manifest.get("content_hash", ""),
        "dataset.path": cfg.data.path,
        "git.commit": git_commit(),
        "storage.path": storage.join(cfg.storage.path, cfg.tracking.run_name),
    }
    run_id = create_config_run(dataclasses.replace(cfg, tracking=tracking), tags)
    return dataclasses.replace(cfg, tracking=dataclasses.replace(tracking, run_id=run_id))


def name_run(cfg: RunConfig, resume: str | None) -> RunConfig:
    import dataclasses

    if resume:
        meta = previous_run(cfg, resume)
        return dataclasses.replace(
            cfg, tracking=dataclasses.replace(cfg.tracking, run_name=resume, run_id=meta.get("run_id", ""))
        )
    return dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or run_name(cfg))
    )


# ----------------------------------------------------------------------------- launch


def init_ray(address: str | None, cfg: RunConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # local Ray: enough logical CPUs for the workers and Ray Data's read tasks beside them
        need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False)
    return ray


def train(cfg: RunConfig, no_ray: bool = False, address: str | None = None) -> dict:
    """Run the training described by a resolved, named, tracked config; returns final metrics."""
    if no_ray:
        from pipeline.loop import run_plain

        return run_plain(cfg)
    from pipeline.loop import ray_trainer

    init_ray(address, cfg)
    result = ray_trainer(cfg).fit()
    if result.error:
        raise result.error
    return result.metrics or {}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except (ConfigError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_json(cfg))
        return 0
    manifest = ensure_dataset(cfg)
    cfg = start_tracking(name_run(cfg, args.resume), manifest)
    print(f"run {cfg.tracking.run_name}  (MLflow run {cfg.tracking.run_id} at {cfg.tracking.uri})")
    try:
        metrics = train(cfg, args.no_ray, args.address)
    except BaseException:
        mark_failed(cfg)
        raise
    if args.metrics_json:
        from pipeline.tracking import run_metrics

        metrics = {**metrics, **run_metrics(cfg.tracking.uri, cfg.tracking.run_id)}
        write_json(args.metrics_json, {"run_name": cfg.tracking.run_name, "run_id": cfg.tracking.run_id,
                                       "wall_s": time.time() - STARTED, "metrics": metrics})
    print(
        f"done: checkpoints in {storage.join(cfg.storage.path, cfg.tracking.run_name)}\n"
        f"compare runs: mlflow ui --backend-store-uri {cfg.tracking.uri}"
    )
    return 0


def write_json(path: str, obj: dict) -> None:
    """Whole or not at all (`storage.write_bytes`)."""
    import json

    storage.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=float).encode())


def mark_failed(cfg: RunConfig) -> None:
    from pipeline.tracking import Tracker

    try:
        Tracker(cfg.tracking.uri, cfg.tracking.run_id).end("FAILED")
    except Exception as e:  # the original error matters more than this one
        print(f"warning: could not mark MLflow run {cfg.tracking.run_id} failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
