"""Move a registered model's alias (default `production`) to a version whose evaluation metrics pass.

    python jobs/promote.py cyclegan_facades-ab --metric test/psnr_ab --min 18
    python jobs/promote.py cyclegan_facades-ab --version 4 --metric test/psnr_ab --min 18 \\
        --metric test/l1_ab --max 0.25 --alias production
    python jobs/promote.py cyclegan_facades-ab --metric test/pixel_acc_ab --min 0.5 --dry-run

Each `--metric KEY` takes the `--min` / `--max` that follow it; every criterion must hold. The
metrics are those logged with the version's model (`Tracker.log_generator(metrics=...)`), else the
latest values on its training run. Scheduled translation jobs read `NAME@production`, so a version
only reaches them through this gate. Exit status: 0 promoted (or would be, with --dry-run), 1 a
criterion failed or a metric is missing (alias unchanged), 2 usage error or unknown model/version.
MLflow: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db as jobs/train.py.
"""

import argparse
import json
import sys
import time

from pipeline import cli, launch, storage
from pipeline.terminal import next_step

PROMOTION_TAG = "transmute.promotion"


class Criterion(argparse.Action):
    """--metric starts a criterion; --min / --max complete the latest one."""

    def __call__(self, parser, namespace, value, option_string=None):
        criteria = namespace.criteria
        if option_string == "--metric":
            criteria.append({"metric": value})
            return
        if not criteria:
            parser.error(f"{option_string} {value} must follow a --metric KEY")
        bound = option_string.lstrip("-")
        if bound in criteria[-1]:
            parser.error(f"--metric {criteria[-1]['metric']} has two {option_string}: give it once")
        criteria[-1][bound] = float(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + cli.EXIT_STATUS)
    p.add_argument("name", help="registered model name, e.g. cyclegan_facades-ab")
    p.add_argument("--version", default="latest", help="version to promote (default: the latest)")
    p.add_argument("--alias", default="production")
    p.add_argument("--metric", action=Criterion, dest="criteria", metavar="KEY", default=[])
    p.add_argument("--min", action=Criterion, dest="criteria", metavar="VALUE", help="lower bound, inclusive")
    p.add_argument("--max", action=Criterion, dest="criteria", metavar="VALUE", help="upper bound, inclusive")
    p.add_argument("--dry-run", action="store_true", help="check and report, leave the alias")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: see below)")
    launch.verbose_flag(p)
    args = p.parse_args(argv)
    args.criteria = list(args.criteria)  # argparse shares the default list between parses
    if not args.criteria:
        p.error("give at least one --metric KEY with --min and/or --max")
    for c in args.criteria:
        if "min" not in c and "max" not in c:
            p.error(f"--metric {c['metric']} needs a --min or --max after it")
    return args


def version_metrics(uri: str, name: str, version: str) -> dict[str, float]:
    from pipeline import registry, tracking

    info = registry.get_model_version_info(uri, name, version)
    metrics = tracking.run_metrics(uri, info["run_id"]) if info["run_id"] else {}
    return {**metrics, **registry.get_model_version_metrics(uri, name, version)}


def failures(criteria: list[dict], metrics: dict[str, float]) -> list[str]:
    """Why each failing criterion fails; [] when all pass."""
    out = []
    for c in criteria:
        key = c["metric"]
        if key not in metrics:
            near = sorted(k for k in metrics if k.split("/")[0] in ("test", "eval")) or sorted(metrics)
            out.append(f"{key} was not logged (logged: {', '.join(near[:20]) or 'nothing'})")
            continue
        value = metrics[key]
        if "min" in c and not value >= c["min"]:
            out.append(f"{key} = {value:.6g} is below --min {c['min']:g}")
        if "max" in c and not value <= c["max"]:
            out.append(f"{key} = {value:.6g} is above --max {c['max']:g}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    launch.quiet(args.verbose)  # telemetry (and noise) off before anything imports mlflow
    return cli.run(promote, args)


def promote(args) -> int:
    from pipeline import registry

    uri = launch.tracking_uri(args.tracking_uri)
    try:
        version = registry.resolve_version(uri, args.name, args.version)
    except registry.ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = version_metrics(uri, args.name, version)
    failed = failures(args.criteria, metrics)
    checked = {c["metric"]: metrics.get(c["metric"]) for c in args.criteria}
    if failed:
        print(f"not promoting {args.name} version {version} to @{args.alias}:", file=sys.stderr)
        for reason in failed:
            print(f"  {reason}", file=sys.stderr)
        print(next_step("train longer or with other settings (python jobs/train.py ...), then promote the "
                        "new version", f"mlflow ui --backend-store-uri {storage.public_uri(uri)}"))
        return cli.CHECK
    if args.dry_run:
        print(f"{args.name} version {version} passes {checked}; --dry-run: @{args.alias} unchanged")
        print(next_step("the same command without --dry-run"))
        return 0
    previous = registry.model_alias_version(uri, args.name, args.alias)
    registry.set_alias(uri, args.name, args.alias, version)
    record = {"alias": args.alias, "criteria": args.criteria, "values": checked, "previous": previous,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    registry.set_model_version_tag(uri, args.name, version, PROMOTION_TAG, json.dumps(record))
    print(f"promoted {args.name} version {version} to @{args.alias} (was {previous or 'unset'}): {checked}")
    print(next_step(f"python jobs/translate.py --model {args.name}@{args.alias} --input IMAGES --output OUT"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
