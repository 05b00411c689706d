"""Seed 000's question, measured: does a DualGAN translate differently in training and inference mode?

    python jobs/norm_study.py                                   # dualgan_facades-quick, three norms
    python jobs/norm_study.py --recipe dualgan_facades --set train.steps=20000 scaling.num_workers=2

Trains one DualGAN per generator norm (batch | batch_renorm | instance) as child MLflow runs of one
parent run, each evaluated in the mode a user is served (batch norm: each image normalised by its
own statistics, with the running-statistics numbers beside them in test_running_stats/ and the gap
in test_running_stats_gap/) and in train mode (test_train_mode/, and test_gap/ from eval mode).
The parent run gets the figure `norm_study_<direction>.png` (rows: one block per norm; columns:
input | train-mode output | eval-mode output, on the same validation images) and
`norm_study.json`, those metrics per norm.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

from jobs.recipes import recipe
from models import MODELS
from pipeline import checkpoint as ckpt
from pipeline import launch
from pipeline.run_config import override, resolve_paths

NORMS = ("batch", "batch_renorm", "instance")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="dualgan_facades-quick")
    p.add_argument("--norms", default=",".join(NORMS), help="comma-separated generator norms")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", type=int, default=4, help="validation images in the figure")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--address", default=None)
    return p.parse_args(argv)


def child_config(args, norm: str, parent_id: str, uri: str, stamp: str):
    sets = [*args.set, f"model.norm={norm}", "eval.train_mode_too=true",
            f"tracking.parent_run_id={parent_id}", f"tracking.uri={uri}",
            f"tracking.run_name={args.recipe}-norm-study-{norm}-{stamp}"]
    cfg = override(recipe(args.recipe), sets + (["data.reader=local"] if args.no_ray else []))
    return resolve_paths(cfg)


def final_nets(cfg):
    spec = MODELS[cfg.model_name]
    nets = spec.build_nets(cfg.model)
    folder = os.path.join(cfg.storage.path, cfg.tracking.run_name)
    latest = ckpt.latest_local(folder)
    if latest is None:
        raise RuntimeError(f"no checkpoint of {cfg.tracking.run_name} under {folder}")
    ckpt.load_nets(latest, nets)
    return spec, nets


def figure(configs: dict, images: int):
    """{direction: figure tensor} over the same validation inputs for every norm."""
    from pipeline.data import LocalReader, ReadSpec
    from pipeline.evaluation import norm_study_figure, train_eval_outputs

    first = next(iter(configs.values()))
    read = dataclasses.replace(ReadSpec.from_config(first, train=False), batch_size=images, seed=0)
    val = next(iter(LocalReader(read)))
    out = {}
    for direction, x in (("ab", val["a"]), ("ba", val["b"])):
        rows = {}
        for norm, cfg in configs.items():
            spec, nets = final_nets(cfg)
            torch.manual_seed(0)  # the same dropout masks for every norm
            rows[norm] = train_eval_outputs(spec, cfg.model, nets, x, direction)
        out[direction] = norm_study_figure(rows, x)
    return out


def table(results: dict) -> dict:
    keep = ("test/", "test_running_stats/", "test_running_stats_gap/", "test_train_mode/", "test_gap/")
    return {norm: {k: v for k, v in m.items() if k.startswith(keep)} for norm, m in results.items()}


def main(argv=None) -> int:
    launch.quiet()  # telemetry off before anything imports mlflow
    from pipeline.tracking import Tracker, create_run

    args = parse_args(argv)
    base = resolve_paths(override(recipe(args.recipe), args.set))
    manifest = launch.ensure_dataset(base)
    uri = launch.with_tracking_uri(base).tracking.uri
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_id = create_run(uri, base.tracking.experiment, f"{args.recipe}-norm-study-{stamp}",
                           params={"norms": args.norms, "recipe": args.recipe,
                                   "overrides": " ".join(args.set)},
                           tags={"study": "norm", "dataset.content_hash": manifest.get("content_hash", "")},
                           home=base.home)
    parent = Tracker(uri, parent_id)
    configs, results = {}, {}
    try:
        for norm in args.norms.split(","):
            cfg = child_config(args, norm, parent_id, uri, stamp)
            cfg = launch.start_tracking(cfg, manifest)
            print(f"[{norm}] training {cfg.tracking.run_name}", flush=True)
            results[norm] = launch.train(cfg, args.no_ray, args.address)
            configs[norm] = dataclasses.replace(cfg)
        for direction, image in figure(configs, args.images).items():
            parent.log_image(image, f"norm_study_{direction}.png")
        parent.log_dict(table(results), "norm_study.json")
        for norm, metrics in table(results).items():
            parent.log_metrics({f"{norm}/{k}": v for k, v in metrics.items()}, 0)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    for norm, metrics in table(results).items():
        gaps = {k: round(v, 4) for k, v in metrics.items() if k.startswith("test_gap/")}
        print(f"{norm:13s} {gaps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
