"""Train a registered GAN on a Parquet dataset with Ray Train (1..N workers, CPU or GPU), tracked in MLflow.

    python jobs/train.py --recipe cyclegan_facades-quick
    python jobs/train.py --recipe dualgan_facades --set model.norm=batch_renorm scaling.num_workers=2
    ray job submit --working-dir . -- python jobs/train.py --recipe cyclegan_facades-quick

Embedded defaults: a local Ray (started if none is reachable), MLflow at sqlite:///<home>/mlflow.db,
checkpoints under <home>/runs, datasets under <home>/data, with home = $TRANSMUTE_HOME or
~/.transmute (made absolute here, so a job submitted with --working-dir writes to the same store).
Ray puts the uploaded --working-dir first on the job's PYTHONPATH, so a cluster needs the
dependencies but no install of this project; locally, `make venv` installs it (editable).
`train.batch_size` is per worker. `--resume NAME` continues run NAME from its newest intact checkpoint
(a corrupt newer one is skipped with a warning naming its bad file), in the same MLflow run; a
resume that fails before training leaves a finished run's MLflow status as it was. Every config
value is checked (and the batch against the dataset's training split) before Ray or an MLflow run
starts. Status 1 below: training itself failed.
"""

import argparse
import json
import sys
import time

STARTED = time.time()  # a --minutes budget counts from here, start-up included

from jobs.recipes import RECIPES, recipe  # noqa: E402
from pipeline import cli, launch, storage  # noqa: E402
from pipeline.checkpoint import CorruptCheckpoint  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.launch import ensure_dataset, mark_failed, name_run, start_tracking, train  # noqa: E402
from pipeline.run_config import RunConfig, override, public_config, resolve_paths, to_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__ + "\n" + cli.EXIT_STATUS,
    )
    p.add_argument("--recipe", help=f"one of: {', '.join(sorted(RECIPES))}")
    p.add_argument(
        "--config", help="a RunConfig JSON file (e.g. a search's best_config.json) instead of a recipe"
    )
    p.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. optim.lr=1e-4 model.norm=batch_renorm (repeatable)",
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
    launch.verbose_flag(p)
    args = p.parse_args(argv)
    if bool(args.recipe) == bool(args.config):
        p.error("give exactly one of --recipe NAME or --config FILE")
    return args


def build_config(args) -> RunConfig:
    try:
        base = load_config_file(args.config) if args.config else recipe(args.recipe)
    except KeyError as e:  # an unknown recipe
        raise ConfigError(e.args[0]) from None
    cfg = override(base, args.set)
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
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    return from_json(text, source=f"--config {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    launch.quiet(args.verbose)  # telemetry (and noise) off before anything imports mlflow or ray
    return cli.run(run, args)


def run(args) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(to_json(public_config(cfg)))
        return 0
    manifest = ensure_dataset(cfg)
    cfg = start_tracking(name_run(cfg, args.resume), manifest)
    where = storage.public_uri(cfg.tracking.uri)
    print(f"run {cfg.tracking.run_name}  (MLflow run {cfg.tracking.run_id} at {where})")
    try:
        metrics = train(cfg, args.no_ray, args.address)
    except CorruptCheckpoint as e:  # every checkpoint of the run is corrupt: say which file
        mark_failed(cfg)
        print(f"error: {e}", file=sys.stderr)
        return cli.STORAGE
    except BaseException:
        mark_failed(cfg)
        raise
    from pipeline.tracking import run_metrics

    # Ray's result holds the last checkpointed report only: the test metrics are in the MLflow run
    metrics = {**metrics, **run_metrics(cfg.tracking.uri, cfg.tracking.run_id)}
    if args.metrics_json:
        result = {"run_name": cfg.tracking.run_name, "run_id": cfg.tracking.run_id,
                  "wall_s": time.time() - STARTED, "metrics": metrics}
        text = json.dumps(result, indent=2, sort_keys=True, default=float)
        storage.write_bytes(args.metrics_json, text.encode())  # whole or not at all
    print(closing(cfg, metrics))
    return 0


def closing(cfg: RunConfig, metrics: dict) -> str:
    """The run's end on the terminal: test metrics beside their floors, where the checkpoints and
    the registered generators are, and what to run next (no secret in any URI)."""
    from pipeline.terminal import metrics_table, next_step

    table = metrics_table(metrics)
    lines = [table] if table else []
    lines.append(f"checkpoints: {storage.public_uri(storage.join(cfg.storage.path, cfg.tracking.run_name))}")
    names = registered(cfg)
    lines += [f"registered model: {name}" for name in names]
    ui = f"mlflow ui --backend-store-uri {storage.public_uri(cfg.tracking.uri)}"
    if names:
        lines.append(next_step(f"python jobs/translate.py --model {names[0]} --input IMAGES --output OUT",
                               promote_command(names[0], metrics), ui))
    else:
        lines.append(next_step(ui))
    return "\n".join(lines)


def promote_command(version: str, metrics: dict) -> str:
    """jobs/promote.py for this version, gated on its first test metric beating its floor."""
    from pipeline.terminal import lower_is_better

    name, _, number = version.partition("/")
    gate = "--metric METRIC --min BOUND"
    floors = sorted(k for k in metrics if k.startswith("test/") and f"baseline/{k[5:]}" in metrics)
    if floors:
        key = floors[0]
        bound = "--max" if lower_is_better(key) else "--min"
        gate = f"--metric {key} {bound} {metrics[f'baseline/{key[5:]}']:.4g}"
    return f"python jobs/promote.py {name} --version {number} {gate}  (then --model {name}@production)"


def registered(cfg: RunConfig) -> list[str]:
    """NAME/VERSION of each generator this run registered (the latest version of each name)."""
    from models import MODELS
    from pipeline.loop_eval import registered_name
    from pipeline.registry import ModelNotFound, resolve_version

    if not (cfg.tracking.register and cfg.tracking.log_models and cfg.tracking.run_id):
        return []
    names = []
    for direction in MODELS[cfg.model_name].directions:
        name = registered_name(cfg, direction)
        try:
            names.append(f"{name}/{resolve_version(cfg.tracking.uri, name)}")
        except ModelNotFound:  # registration failed or was skipped: nothing to name
            continue
    return names


if __name__ == "__main__":
    sys.exit(main())
