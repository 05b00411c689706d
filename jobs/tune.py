"""Search hyperparameters of any recipe with Ray Tune (ASHA or PBT); one MLflow run per trial.

    python jobs/tune.py --recipe dualgan_facades-quick --space optim.lr=loguniform:1e-5:1e-3 \\
        --metric eval/pixel_acc_ab --num-samples 4 --scheduler asha
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune.py ...

Each trial trains the recipe with its sampled values (dotted config keys), evaluates on the
validation split every --eval-every steps in eval mode and reports the objective, so ASHA can
stop bad trials early; PBT copies the complete state of good trials into bad ones and perturbs
the continuous keys. The MLflow parent run gets the space, scheduler settings, best trial, best
config and a results table; the best config is also written as JSON, runnable with
`python jobs/train.py --config <best_config.json>`. `--resume` continues an interrupted search
from its storage folder without repeating finished trials, once every state file Ray would unpickle
there passes its signature check (pipeline.tune_state; key: --state-key or $TRANSMUTE_TUNE_KEY).

A refused resume (state not signed by this search's key) is exit status 4; 130: interrupted
(resume it with --resume --name NAME).
"""

import argparse
import dataclasses
import os
import sys
import time

from jobs.recipes import RECIPES, recipe
from pipeline import cli, launch, search, storage, tune_state
from pipeline.config import ConfigError
from pipeline.launch import ensure_dataset, init_ray, training_cpus, with_tracking_uri
from pipeline.run_config import RunConfig, override, resolve_paths, to_json
from pipeline.terminal import next_step, search_warnings


def add_arguments(p: argparse.ArgumentParser, defaults: dict) -> argparse.ArgumentParser:
    p.add_argument(
        "--recipe",
        default=defaults.get("recipe"),
        required="recipe" not in defaults,
        help=f"one of: {', '.join(sorted(RECIPES))}",
    )
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="fixed overrides of the recipe (repeatable)")
    p.add_argument(
        "--space",
        nargs="*",
        action="extend",
        default=None,
        metavar="KEY=SPEC",
        help="uniform:LOW:HIGH loguniform:LOW:HIGH int:LOW:HIGH choice:a,b grid:a,b or a value (repeatable)",
    )
    p.add_argument("--space-file", help="JSON file {key: spec}, merged under --space")
    p.add_argument(
        "--metric",
        default=defaults.get("metric", "eval/psnr_ab"),
        help="validation metric to optimise (eval/...)",
    )
    p.add_argument("--mode", choices=("min", "max"), help="default: min for l1/fid/kid/loss, else max")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps per trial (default: recipe's; replaces a recipe's time budget)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget per trial (train.max_minutes): each trial fixes its own steps")
    p.add_argument(
        "--eval-every", type=int, default=None,
        help="steps between reports (default: max-steps/6; under a time budget the recipe's eval.every)",
    )
    p.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="per worker")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    p.add_argument("--storage", default="", help="Tune storage, local or s3:// (default <home>/tune)")
    p.add_argument("--name", default="", help="search name (default recipe-scheduler-time)")
    p.add_argument("--resume", action="store_true", help="continue the search --name from its storage")
    p.add_argument(
        "--state-key",
        default=None,
        help="HMAC key that signs the search's Ray state, kept off the shared storage "
        "(default: $TRANSMUTE_TUNE_KEY, else <home>/keys/tune-state.key, made 0600 on first use)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-table", action="store_true",
                   help="no Tune status table while the search runs (the final tables stay)")
    launch.verbose_flag(p)
    return p


def parse_args(argv=None, defaults: dict | None = None):
    defaults = defaults or {}
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__ + "\n" + cli.EXIT_STATUS,
    )
    args = add_arguments(p, defaults).parse_args(argv)
    if args.space is None:
        args.space = list(defaults.get("space", []))
    if args.resume and not args.name:
        p.error("--resume needs --name of the search to continue")
    return args


def base_config(args) -> RunConfig:
    try:
        cfg = recipe(args.recipe)
    except KeyError as e:  # an unknown recipe
        raise ConfigError(e.args[0]) from None
    cfg = override(cfg, args.set)
    fixed = {
        **trial_length(args, cfg),
        "train.seed": args.seed,
        "scaling.num_workers": args.workers_per_trial,
        "scaling.cpus_per_worker": args.cpus_per_trial,
        "scaling.use_gpu": args.gpus_per_trial > 0,
        "tracking.register": False,
        "tracking.log_models": False,
    }
    if args.workers_per_trial == 1:
        fixed["data.reader"] = "local"  # in the trial's own process: no Ray Data tasks to schedule
    return resolve_paths(override(cfg, fixed))


def trial_length(args, cfg: RunConfig) -> dict:
    """Steps and report interval of a trial. Under a time budget the steps are unknown until each
    trial times itself, so the reports keep the recipe's (or --eval-every's) interval rather than a
    sixth of a placeholder step count (which would leave ASHA a single report per trial)."""
    if args.minutes is not None:
        return {"train.max_minutes": args.minutes, **trial_every(args, cfg.eval.every)}
    if cfg.train.max_minutes and not args.max_steps:
        return trial_every(args, cfg.eval.every)
    steps = args.max_steps or cfg.train.steps
    return {"train.steps": steps, "train.max_minutes": 0.0, **trial_every(args, max(1, steps // 6))}


def trial_every(args, default: int) -> dict:
    every = args.eval_every or default
    return {"eval.every": every, "checkpoint.every": every}


def scheduler_for(args, dims, mode: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if args.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
    if args.scheduler == "fifo":
        return FIFOScheduler()
    mutations = search.pbt_mutations(dims)
    if not mutations:
        raise ConfigError("--scheduler pbt needs at least one continuous dimension (uniform: or loguniform:)")
    if args.workers_per_trial > 1:
        raise ConfigError(
            "--scheduler pbt runs with --workers-per-trial 1 (its exploit copies Tune "
            "checkpoints, which multi-worker trials keep in Ray Train's storage)"
        )
    return PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=1,
        hyperparam_mutations=mutations,
        quantile_fraction=0.5,
        resample_probability=0.25,
        synch=False,
    )


def search_name(args) -> str:
    return args.name or f"{args.recipe}-{args.scheduler}-{time.strftime('%Y%m%d-%H%M%S')}"


def parent_run(cfg: RunConfig, args, name: str, dims, mode: str) -> str:
    from pipeline.tracking import create_run, find_run

    tags = {"tune.search": name, "tune.role": "parent"}
    found = find_run(cfg.tracking.uri, cfg.tracking.experiment, tags) if args.resume else None
    if found:
        return found
    params = {
        **{f"space.{d.key}": f"{d.kind}:{','.join(map(str, d.values))}" for d in dims},
        "scheduler": args.scheduler,
        "metric": args.metric,
        "mode": mode,
        "num_samples": args.num_samples,
        "max_steps": f"budget {cfg.train.max_minutes:g} min" if cfg.train.max_minutes else cfg.train.steps,
        "eval_every": cfg.eval.every,
        "workers_per_trial": args.workers_per_trial,
        "gpus_per_trial": args.gpus_per_trial,
        "recipe": args.recipe,
        "overrides": " ".join(args.set),
    }
    return create_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        name,
        params=params,
        tags={**tags, "model": cfg.model_name, "recipe": args.recipe},
        home=cfg.home,
    )


def make_tuner(args, cfg: RunConfig, dims, mode: str, name: str, storage_path: str):
    from ray import tune

    search.keep_keys_out_of_trials()
    searched = [d.key for d in dims if d.kind != "constant"]
    trainable = tune.with_parameters(search.run_trial, base_json=to_json(cfg), search_name=name,
                                     searched=searched, metric=args.metric)
    trainable = tune.with_resources(trainable, search.trial_resources(cfg, args.gpus_per_trial))
    filesystem, path = (
        storage.arrow_filesystem(storage_path, cfg.storage.endpoint or None)
        if storage.is_s3(storage_path)
        else (None, storage_path)
    )
    keep = None if args.scheduler == "pbt" else 2  # PBT's exploit needs the donor's checkpoint kept
    run_config = tune.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=filesystem,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        failure_config=tune.FailureConfig(max_failures=1),
        callbacks=[tune_state.StateSigner(name, tune_state.key_path(cfg.home, args.state_key))],
        verbose=0 if args.no_table else None,  # 0: Tune prints nothing while it runs
    )
    if args.resume:
        return tune.Tuner.restore(
            storage.join(storage_path, name),
            trainable=trainable,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    tune_config = tune.TuneConfig(
        metric=args.metric,
        mode=mode,
        scheduler=scheduler_for(args, dims, mode),
        num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent or None,
    )
    tuner = tune.Tuner(
        trainable, param_space=search.tune_space(dims), tune_config=tune_config, run_config=run_config
    )
    sign_tuner(args, cfg, name, storage_path)  # Ray has just written tuner.pkl
    return tuner


def state_folder(cfg: RunConfig, name: str, storage_path: str):
    """The search's folder as (pyarrow filesystem, path), where Ray keeps its state."""
    return storage.arrow_filesystem(storage.join(storage_path, name), cfg.storage.endpoint or None)


def sign_tuner(args, cfg: RunConfig, name: str, storage_path: str) -> None:
    key = tune_state.load_key(tune_state.key_path(cfg.home, args.state_key), create=True)
    tune_state.sign_stored(key, name, *state_folder(cfg, name, storage_path), ["tuner.pkl"])


def check_resumable(args, cfg: RunConfig, name: str, storage_path: str) -> None:
    """Before Ray or MLflow is touched: every state file Ray would unpickle carries this search's
    signature (pipeline.tune_state), else StateRefused. The key path is handed to the signer that
    Ray restores from tuner.pkl through the environment, so a moved key signs the resumed saves."""
    path = tune_state.key_path(cfg.home, args.state_key)
    tune_state.verify(tune_state.load_key(path, create=False), name, *state_folder(cfg, name, storage_path))
    os.environ[tune_state.KEY_ENV] = path


def summarise(results, args, cfg: RunConfig, mode: str, out_dir: str, parent_id: str) -> dict:
    """Best trial and config, results table: printed, saved beside the search, logged to the parent."""
    from pipeline.tracking import Tracker

    best = results.get_best_result(metric=args.metric, mode=mode, scope="all")
    params = {k: v for k, v in best.config.items()}
    best_json = search.best_run_config(to_json(cfg), params)
    best_path = os.path.join(out_dir, "best_config.json")
    storage.write_bytes(best_path, best_json.encode())  # makes out_dir, for the table beside it
    table = results.get_dataframe(filter_metric=args.metric, filter_mode=mode)
    keep = [
        c
        for c in table.columns
        if c.startswith(("config/", "eval/", "test/"))
        or c in ("trial_id", "step", "training_iteration", "progress/resumed_from_step")
        or c == f"floor/{args.metric}"
    ]
    table_path = os.path.join(out_dir, "results.csv")
    table[keep].to_csv(table_path, index=False)
    value = search.trial_best(best.metrics_dataframe, args.metric, mode)
    values = [search.trial_best(r.metrics_dataframe, args.metric, mode) for r in results]
    floor = search.trial_floor(best.metrics_dataframe, args.metric)
    warnings = search_warnings(values, args.metric, mode, floor)
    parent = Tracker(cfg.tracking.uri, parent_id)
    # tags, not params: a resumed search may find another best trial, and params never change
    parent.set_tags(
        {"best.trial_id": best.metrics.get("trial_id", ""), **{f"best.{k}": v for k, v in params.items()}}
    )
    parent.log_metrics({"objective": float(value), f"best/{args.metric}": float(value)}, 0)
    if warnings:
        parent.set_tags({"warnings": "\n".join(warnings)})
    parent.log_artifact(best_path)
    parent.log_artifact(table_path)
    log_search_views(parent, table, args, cfg, out_dir, float(value), params)
    parent.end("FINISHED")
    return {
        "best_config": best_path,
        "results": table_path,
        "best_value": float(value),
        "best_params": params,
        "warnings": warnings,
    }


def log_search_views(parent, table, args, cfg: RunConfig, out_dir: str, value: float, params: dict) -> None:
    """What the parent run shows: a plot of the objective against each searched key, and a
    description (recipe, dataset, one-line result)."""
    from pipeline.tracking import describe

    dims = [d for d in search.parse_space(args.space, cfg, args.space_file) if d.kind != "constant"]
    if dims:
        plot = search.objective_plot(table, dims, args.metric, os.path.join(out_dir, "objective_vs_keys.png"))
        parent.log_artifact(plot)
    values = search.trial_display_name(params, [d.key for d in dims])
    describe(cfg.tracking.uri, parent.run_id,
             f"Search over {', '.join(d.key for d in dims) or 'nothing'} for recipe {args.recipe} on "
             f"{cfg.data.dataset or cfg.data.path} ({len(table)} trials, {args.scheduler}): "
             f"best {args.metric} = {value:.4f} with {values}. Plot: objective_vs_keys.png; "
             "table: results.csv.")


def run(args) -> dict:
    cfg = base_config(args)
    dims = search.parse_space(args.space, cfg, args.space_file)
    search.check_metric(args.metric)
    mode = search.metric_mode(args.metric, args.mode)
    name = search_name(args)
    storage_path = args.storage or os.path.join(cfg.home, "tune")
    if args.resume:
        check_resumable(args, cfg, name, storage_path)
    manifest = ensure_dataset(cfg)
    cfg = with_tracking_uri(cfg)
    parent_id = parent_run(cfg, args, name, dims, mode)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, parent_run_id=parent_id))
    print(
        f"search {name}: {len(dims)} dimensions, {args.num_samples} samples, {args.scheduler}, "
        f"objective {args.metric} ({mode}); dataset {manifest.get('content_hash', '')}; "
        f"MLflow parent run {parent_id} at {storage.public_uri(cfg.tracking.uri)}",
        flush=True,
    )
    init_ray(args.address, training_cpus(cfg))
    results = make_tuner(args, cfg, dims, mode, name, storage_path).fit()
    if results.num_terminated + results.num_errors < len(results):  # Ctrl-C: Tune saved its state
        from pipeline.tracking import Tracker

        Tracker(cfg.tracking.uri, parent_id).end("KILLED")
        print(
            f"search {name} interrupted; continue it with the same command plus --resume --name {name}",
            file=sys.stderr,
        )
        raise SystemExit(130)
    errors = [r.error for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every trial failed; first error: {errors[0]}")
    out_dir = (
        os.path.join(cfg.home, "tune", name)
        if storage.is_s3(storage_path)
        else storage.join(storage_path, name)
    )
    summary = summarise(results, args, cfg, mode, out_dir, parent_id)
    print(
        f"best {args.metric} = {summary['best_value']:.4f} with {summary['best_params']}\n"
        f"best config: {summary['best_config']}\n"
        f"results table: {summary['results']}; {len(errors)} trial(s) errored",
        flush=True,
    )
    for warning in summary["warnings"]:
        print(warning, file=sys.stderr, flush=True)
    ui = f"mlflow ui --backend-store-uri {storage.public_uri(cfg.tracking.uri)}"
    print(next_step(f"python jobs/train.py --config {summary['best_config']}", ui), flush=True)
    return summary


def main(argv=None, defaults: dict | None = None) -> int:
    args = parse_args(argv, defaults)
    launch.quiet(args.verbose)  # telemetry (and noise) off before anything imports mlflow or ray
    return cli.run(search_job, args)


def search_job(args) -> int:
    try:
        run(args)
    except tune_state.StateRefused as e:  # a ConfigError, but a failed check of the state: its own code
        print(f"error: {e}", file=sys.stderr)
        return cli.CHECK
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
