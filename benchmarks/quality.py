"""Quality for a time budget: train a recipe for M minutes and print its metrics beside their floors,
ceilings and targets.

    python -m benchmarks.quality --recipe cyclegan_mnist2mnistm-15min               # its own budget
    python -m benchmarks.quality --recipe cogan_digits-15min --minutes 5 --set train.seed=1
    python -m benchmarks.quality --all                      # every -15min recipe, one after another
    python -m benchmarks.quality --recipe cyclegan_facades-15min --no-ray --device cuda   # GPU box

With Ray (the default) it runs `jobs/train.py --recipe R --minutes M` as a user would (Ray Train,
MLflow, registration) in a subprocess and times it from the command's start to its end. `--no-ray`
runs the plain loop in this process without MLflow (the GPU machine has torch but neither Ray nor
MLflow: nothing here imports them unless asked for). The figures are the TEST split's metrics
(`test/...`), their floors (`baseline/...`: the mean image, the most frequent class, untranslated
inputs; chance for CoGAN's pair agreement) and ceilings (`ceiling/...`: the judge on real images).
`--all` writes the table (markdown) to --table, README's 'Quality' section shows it. Run it with
`-m` from the repository root: the GPU machine has a bare checkout, no install of the project.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe family -> [(metric, floor, ceiling, target, "higher"|"lower")]; floor/ceiling are metric
# names, tuples of names (their product), numbers, or None. The targets are issue 11's, for
# 15 minutes of the 2-core machine.
SCORES = {
    "cyclegan_mnist2mnistm": [
        ("test/label_acc_ba", "baseline/label_acc_ba", "ceiling/label_acc_ba", 0.65, "higher"),
        ("test/label_acc_ab", "baseline/label_acc_ab", "ceiling/label_acc_ab", 0.60, "higher"),
        ("test/realism_ab", "baseline/realism_ab", "ceiling/realism_ab", 0.90, "higher"),
    ],
    "cogan_digits": [  # ceiling: both judges right on real digits (the product of their accuracies)
        ("test/pair_agreement", 0.10, ("test/judge_acc_a", "test/judge_acc_b"), 0.85, "higher"),
        ("test/pair_class_entropy", 0.0, 1.0, None, "higher"),
    ],
    "cyclegan_facades": [
        ("test/pixel_acc_ab", "baseline/pixel_acc_ab", 1.0, 0.45, "higher"),
        ("test/psnr_ba", "baseline/psnr_ba", None, None, "higher"),
        ("test/l1_ba", "baseline/l1_ba", 0.0, None, "lower"),
        ("test/ssim_ba", "baseline/ssim_ba", 1.0, None, "higher"),
    ],
    "pix2pix_facades": [
        ("test/l1_ab", "baseline/l1_ab", 0.0, None, "lower"),
        ("test/ssim_ab", "baseline/ssim_ab", 1.0, None, "higher"),
        ("test/psnr_ab", "baseline/psnr_ab", None, None, "higher"),
    ],
}
SCORES["dualgan_facades"] = SCORES["cyclegan_facades"]
SCORES["bicyclegan_facades"] = SCORES["pix2pix_facades"] + [
    ("test/diversity", 0.0, None, 0.10, "higher"),
]


def family(recipe: str) -> str:
    for name in sorted(SCORES, key=len, reverse=True):
        if recipe == name or recipe.startswith(name + "-"):
            return name
    raise SystemExit(f"error: no quality metrics are defined for recipe {recipe!r}; "
                     f"known: {', '.join(sorted(SCORES))}")


def budget_recipes() -> list[str]:
    from jobs.recipes import RECIPES

    return sorted(r for r in RECIPES if r.endswith("-15min"))


def value(metrics: dict, ref):
    """A metric by name, a product of metrics by a tuple of names, or a number as it is."""
    if isinstance(ref, tuple):
        parts = [metrics.get(name) for name in ref]
        return None if None in parts else float(math.prod(parts))
    return metrics.get(ref) if isinstance(ref, str) else ref


def scorecard(recipe: str, metrics: dict) -> list[dict]:
    """Each quality metric beside its floor, ceiling and target, and whether it passes both."""
    rows = []
    for name, floor, ceiling, target, better in SCORES[family(recipe)]:
        got, low = metrics.get(name), value(metrics, floor)
        higher = better == "higher"
        beats_floor = None if got is None or low is None else (got > low if higher else got < low)
        meets = None if got is None or target is None else (got >= target if higher else got <= target)
        rows.append({"metric": name, "value": got, "floor": low, "ceiling": value(metrics, ceiling),
                     "target": target, "better": better, "beats_floor": beats_floor, "meets_target": meets})
    return rows


def run_with_ray(recipe: str, minutes: float | None, overrides: list[str], home: str | None) -> dict:
    """jobs/train.py as a user runs it; wall time from the command's start to its exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "metrics.json")
        command = [sys.executable, os.path.join(REPO, "jobs", "train.py"), "--recipe", recipe,
                   "--metrics-json", out]
        command += ["--minutes", str(minutes)] if minutes else []
        command += ["--set", *overrides] if overrides else []
        env = {**os.environ, **({"TRANSMUTE_HOME": home} if home else {})}
        # this checkout's code, as the benchmark's own, whether or not the project is installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        start = time.time()
        done = subprocess.run(command, env=env)
        wall = time.time() - start
        if done.returncode:
            raise SystemExit(f"error: {' '.join(command)} exited with {done.returncode}")
        with open(out) as f:
            result = json.load(f)
    return {"wall_s": wall, "run_name": result["run_name"], "run_id": result["run_id"],
            "metrics": result["metrics"]}


def run_plain(recipe: str, minutes: float | None, overrides: list[str], home: str | None,
              device: str) -> dict:
    """The plain loop in this process, no MLflow, no Ray: for machines without them (the GPU box)."""
    start = time.time()
    from jobs.recipes import recipe as load_recipe
    from pipeline.data import ingest, read_manifest
    from pipeline.launch import DATASETS
    from pipeline.loop import run_plain as plain_loop
    from pipeline.run_config import override, resolve_paths

    settings = {"data.reader": "local", "tracking.log_models": False, "train.started_at": start,
                **({"train.max_minutes": minutes} if minutes else {}),
                **({"home": home} if home else {}), **({"scaling.use_gpu": True} if device == "cuda" else {})}
    cfg = resolve_paths(override(override(load_recipe(recipe), overrides), settings))
    try:
        read_manifest(cfg.data.path)
    except FileNotFoundError:
        ingest(cfg.data.source or os.path.join(DATASETS, cfg.data.dataset), cfg.data.path, progress=False)
    import dataclasses

    name = f"{recipe}-quality-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name=name, run_id=""))
    metrics = plain_loop(cfg, device=device)
    return {"wall_s": time.time() - start, "run_name": name, "run_id": "", "metrics": metrics}


def measure(args, recipe: str) -> dict:
    minutes, commit = args.minutes, git_commit()  # the code the run starts with
    if args.no_ray:
        result = run_plain(recipe, minutes, args.set, args.home, args.device)
    else:
        result = run_with_ray(recipe, minutes, args.set, args.home)
    metrics = result.pop("metrics")
    return {"recipe": recipe, "minutes": minutes, "commit": commit, **result,
            "steps": metrics.get("step"), "scores": scorecard(recipe, metrics)}


def git_commit() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it."""
    git = ["git", "-C", REPO]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    head = head.stdout.strip()
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"]).returncode != 0
    return (head or "unknown") + ("+dirty" if head and dirty else "")


def fmt(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1000:
        x = int(x)  # a step count read back from MLflow
    return "–" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def table(results: list[dict]) -> str:
    lines = ["| recipe | wall | steps | metric | value | floor | ceiling | target | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r["scores"]:
            mark = "" if s["meets_target"] is None else (" ✓" if s["meets_target"] else " ✗")
            lines.append(f"| {r['recipe']} | {r['wall_s'] / 60:.1f} min | {fmt(r['steps'])} | "
                         f"{s['metric']} | "
                         f"{fmt(s['value'])}{mark} | {fmt(s['floor'])} | {fmt(s['ceiling'])} | "
                         f"{fmt(s['target'])} | {r['commit']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="a recipe (e.g. cyclegan_mnist2mnistm-15min)")
    p.add_argument("--all", action="store_true", help="every -15min recipe, one after another")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget (default: the recipe's own train.max_minutes)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for the run (repeatable)")
    p.add_argument("--no-ray", action="store_true", help="plain loop in this process, no MLflow")
    p.add_argument("--device", default="cpu", help="with --no-ray: cpu or cuda")
    p.add_argument("--home", default=None, help="TRANSMUTE_HOME for the runs (default: the user's)")
    p.add_argument("--table", default="quality_table.md",
                   help="with --all: where to write the markdown table")
    args = p.parse_args(argv)
    if bool(args.recipe) == args.all:
        p.error("give exactly one of --recipe R or --all")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = []
    for recipe in budget_recipes() if args.all else [args.recipe]:
        family(recipe)  # an unknown family fails before minutes of training
        results.append(measure(args, recipe))
        print(json.dumps(results[-1], default=float), flush=True)
    print(table(results))
    if args.all:
        from pipeline import storage

        storage.write_bytes(args.table, (table(results) + "\n").encode())
        print(f"table written to {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
