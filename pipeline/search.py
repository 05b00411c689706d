"""Hyperparameter search with Ray Tune over any recipe: search spaces on dotted config keys, ASHA or
PBT, one MLflow run per trial nested under the search's parent run.

Trials with one worker (the default) run the training loop inside the trial's own Tune actor
(`pipeline.session.TuneSession`) and report complete checkpoints to Tune, so PBT's exploit copies
the whole training state (nets, optimizers, schedules, pools, RNG, step) from the donor and the
mutated hyperparameters apply on restore. Trials with several workers run a TorchTrainer inside
the trial (Ray Train V2 takes no Trainer in a Tuner) and forward its reports to Tune; they support
ASHA, not PBT (their checkpoints live in Ray Train's storage, out of Tune's reach).

Space syntax (CLI `--space key=spec`, or a JSON file {key: spec}):
    uniform:LOW:HIGH  loguniform:LOW:HIGH  int:LOW:HIGH  choice:a,b,c  grid:a,b,c  (a constant value)
"""

import dataclasses
import json
import os

from pipeline.config import ConfigError
from pipeline.run_config import RunConfig, from_json, override, to_json
from pipeline.terminal import lower_is_better

CONTINUOUS = ("uniform", "loguniform")


@dataclasses.dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # uniform | loguniform | int | choice | grid | constant
    values: tuple

    @property
    def continuous(self) -> bool:
        return self.kind in CONTINUOUS


def parse_dimension(key: str, spec, cfg: RunConfig) -> Dimension:
    """One dimension, its values typed as the config field they set (checked against `cfg`)."""
    kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in ("uniform", "loguniform", "int", "choice", "grid"):
        return Dimension(key, "constant", (_typed(cfg, key, spec),))
    if kind in CONTINUOUS + ("int",):
        parts = [p for p in rest.split(":") if p.strip()]
        if len(parts) != 2:
            raise ConfigError(f"--space {key}={spec}: {kind} takes LOW:HIGH")
        low, high = (float(p) for p in parts)
        if low >= high or (kind == "loguniform" and low <= 0):
            raise ConfigError(
                f"--space {key}={spec}: need 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise"
            )
        _typed(cfg, key, str(int(low) if kind == "int" else low))
        return Dimension(key, kind, (low, high))
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--space {key}={spec}: {kind} needs at least one value")
    return Dimension(key, kind, tuple(_typed(cfg, key, p) for p in parts))


def _typed(cfg: RunConfig, key: str, text):
    """`text` as the type of config field `key` (an unknown key raises, naming the valid ones)."""
    value = override(cfg, {key: text})
    for part in key.split("."):
        value = getattr(value, part)
    return value


def parse_space(items: list[str], cfg: RunConfig, json_file: str | None = None) -> list[Dimension]:
    specs = {}
    if json_file:
        specs.update(_space_file(json_file))
    for item in items:
        key, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(f"--space {item!r} must look like key=spec (e.g. renorm.rmax=uniform:1.5:5)")
        specs[key.strip()] = spec.strip()
    return [parse_dimension(k, v, cfg) for k, v in specs.items()]


def _space_file(path: str) -> dict:
    try:
        with open(path) as f:
            specs = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--space-file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(specs, dict):
        raise ConfigError(f"--space-file {path}: must be a JSON object {{key: spec}}")
    return specs


def tune_space(dims: list[Dimension]) -> dict:
    from ray import tune

    make = {
        "uniform": lambda d: tune.uniform(*d.values),
        "loguniform": lambda d: tune.loguniform(*d.values),
        "int": lambda d: tune.randint(int(d.values[0]), int(d.values[1]) + 1),
        "choice": lambda d: tune.choice(list(d.values)),
        "grid": lambda d: tune.grid_search(list(d.values)),
        "constant": lambda d: d.values[0],
    }
    return {d.key: make[d.kind](d) for d in dims}


def pbt_mutations(dims: list[Dimension]) -> dict:
    """PBT perturbs only continuous keys: a categorical jump (norm kind) would not fit the copied
    weights and optimizer state."""
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    return {d.key: make[d.kind](*d.values) for d in dims if d.continuous}


def metric_mode(metric: str, mode: str | None = None) -> str:
    if mode:
        if mode not in ("min", "max"):
            raise ConfigError(f"--mode must be min or max, got {mode!r}")
        return mode
    return "min" if lower_is_better(metric) else "max"


def check_metric(metric: str) -> None:
    """The objective is measured on the validation split, never the test split."""
    if not metric.startswith(("eval/", "eval_")):
        raise ConfigError(
            f"--metric {metric!r}: optimise a validation metric (eval/...), e.g. "
            "eval/pixel_acc_ab; test/ metrics are reported but never optimised"
        )


# ----------------------------------------------------------------------------- the trial


def trial_config(base_json: str, params: dict, trial_id: str, trial_name: str) -> RunConfig:
    """The trial's RunConfig: the base with the sampled values, its own run name and storage."""
    cfg = override(from_json(base_json), {k: v for k, v in params.items()})
    tracking = dataclasses.replace(cfg.tracking, run_name=trial_name, run_id="", register=False)
    storage = dataclasses.replace(cfg.storage, path=os.path.join(cfg.storage.path, "trials"))
    return dataclasses.replace(cfg, tracking=tracking, storage=storage)


def trial_run_id(cfg: RunConfig, trial_id: str, search_name: str, display_name: str = "") -> str:
    """This trial's MLflow run: found by its trial id (after a restart, a PBT exploit or --resume)
    or created under the search's parent run, named `display_name` (its searched values) and with
    the dataset attached. A PBT exploit copies the donor's checkpoint, but never its run: each
    trial logs to its own run."""
    from pipeline.data import read_manifest
    from pipeline.tracking import attach_dataset, create_config_run, find_run

    tags = {"tune.trial_id": trial_id, "tune.search": search_name}
    run_id = find_run(cfg.tracking.uri, cfg.tracking.experiment, tags)
    if not run_id:
        tags.update({"model": cfg.model_name, "recipe": cfg.recipe, "dataset": cfg.data.dataset,
                     "tune.trial_name": cfg.tracking.run_name})
        run_id = create_config_run(cfg, tags, run_name=display_name or None)
    # Also for a found run: its first try may have stopped between creating it and attaching
    # (attaching twice links the dataset once).
    attach_dataset(cfg, run_id, read_manifest(cfg.data.path, cfg.storage.endpoint or None))
    return run_id


def short_value(value) -> str:
    """1.6e-4, 586, 0.5, batch: three significant digits, exponents without padding."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    text = f"{value:.3g}"
    mantissa, e, exponent = text.partition("e")
    if not e and value != 0 and abs(value) < 1e-3:
        mantissa, e, exponent = f"{value:.2e}".partition("e")
    if not e:
        return text
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent)}"


def trial_display_name(params: dict, searched=None) -> str:
    """A trial's name in the MLflow UI: its searched values, e.g. "lr=1.6e-4 lambda_cycle=586
    norm=batch" (keys by their last part unless two searched keys share it)."""
    keys = [k for k in params if searched is None or k in searched]
    last = [k.rsplit(".", 1)[-1] for k in keys]
    names = [short if last.count(short) == 1 else key for key, short in zip(keys, last, strict=True)]
    return " ".join(f"{n}={short_value(params[k])}" for n, k in zip(names, keys, strict=True))


class ObjectiveFirst:
    """A trial's tracker that also logs the search objective as `objective`, and logs it as the
    run's first metric: MLflow's compare view plots the first metric the runs share (their
    metrics in the order first logged), which was a constant baseline. Until the first
    evaluation brings the objective, the loop's metrics wait here (their steps kept); `end`
    flushes them if it never comes."""

    def __init__(self, tracker, metric: str):
        self.tracker, self.metric, self.waiting = tracker, metric, []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.metric in metrics:
            objective = {"objective": metrics[self.metric]}
            if self.waiting is not None:
                self.tracker.log_metrics(objective, step)
                self._flush()
            metrics = {**metrics, **objective}
        if self.waiting is not None:
            self.waiting.append((dict(metrics), step))
        else:
            self.tracker.log_metrics(metrics, step)

    def _flush(self) -> None:
        waiting, self.waiting = self.waiting or [], None
        for metrics, step in waiting:
            self.tracker.log_metrics(metrics, step)

    def end(self, status: str = "FINISHED") -> None:
        self._flush()
        self.tracker.end(status)

    def __getattr__(self, name):
        return getattr(self.tracker, name)


def objective_tracker(cfg, rank: int, metric: str = ""):
    """The trial's tracker factory: `open_tracker`'s, in an `ObjectiveFirst` when there is an objective."""
    from pipeline.session import open_tracker

    tracker = open_tracker(cfg, rank)
    return ObjectiveFirst(tracker, metric) if metric and tracker.run_id else tracker


def run_trial(params: dict, base_json: str, search_name: str, searched=None, metric: str = "") -> None:
    """Tune's function trainable. `searched`: the keys the search varies (the trial's name shows
    their values; default all of `params`); `metric`: the objective, also logged as `objective`."""
    import functools

    from ray import tune

    from pipeline.loop import run_training
    from pipeline.session import TuneSession

    context = tune.get_context()
    cfg = trial_config(base_json, params, context.get_trial_id(), context.get_trial_name())
    run_id = trial_run_id(cfg, context.get_trial_id(), search_name, trial_display_name(params, searched))
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_id=run_id))
    make_tracker = functools.partial(objective_tracker, metric=metric)
    if cfg.scaling.num_workers == 1:
        run_training(cfg, TuneSession(cfg), make_tracker)
    else:
        run_trainer_in_trial(cfg, make_tracker)


def run_trainer_in_trial(cfg: RunConfig, make_tracker=None) -> None:
    """Several workers per trial: a TorchTrainer whose reports reach Tune through a callback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.loop import ray_trainer
    from pipeline.session import open_tracker

    trainer = ray_trainer(cfg, make_tracker or open_tracker)
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), TuneReportCallback()]
    result = trainer.fit()
    if result.error:
        raise result.error


# What Ray Tune copies from the driver's environment into every trial's runtime env, which Ray writes
# to its logs (ray.tune.execution.class_cache, Ray 2.x); the keys among them must stay out.
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_keys_out_of_trials() -> None:
    """Stop Tune sending the driver's AWS keys to trials in a runtime env (call before Tuner.fit).
    Trials resolve S3 credentials as every worker does: from their node's environment (inherited
    from the driver by a local Ray), a credentials file or an instance role."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set())
    propagated.difference_update(AWS_SECRETS)  # in place: Tune reads the module's set at each trial


def trial_resources(cfg: RunConfig, gpus_per_trial: float) -> dict:
    """Explicit per-trial requests so that trials queue rather than deadlock on a small cluster."""
    if cfg.scaling.num_workers == 1:
        return {"CPU": cfg.scaling.cpus_per_worker, "GPU": gpus_per_trial}
    return {"CPU": 0.1}  # the trial only drives its TorchTrainer, whose workers hold the resources


def best_run_config(base_json: str, params: dict) -> str:
    """The best trial's complete RunConfig as JSON, runnable with `jobs/train.py --config FILE`."""
    cfg = override(from_json(base_json), params)
    tracking = dataclasses.replace(
        cfg.tracking, run_id="", run_name="", parent_run_id="", register=True, log_models=True
    )
    return to_json(dataclasses.replace(cfg, tracking=tracking))


def objective_plot(table, dims: list[Dimension], metric: str, path: str) -> str:
    """One panel per searched key: each trial's objective (`metric`, its last reported value)
    against the key's value, written as PNG at `path` (local). Log-scaled for loguniform keys;
    categorical keys at evenly spaced positions named by their values."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.4), squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        x, y = table[f"config/{d.key}"], table[metric]
        if d.continuous or d.kind == "int":
            ax.scatter(x.astype(float), y)
            ax.set_xscale("log" if d.kind == "loguniform" else "linear")
        else:
            labels = [str(v) for v in d.values]
            ax.scatter([labels.index(str(v)) for v in x], y)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(d.key)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} by trial")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def trial_best(frame, metric: str, mode: str) -> float | None:
    """A trial's best reported value of `metric` (None: it never reported it)."""
    if frame is None or metric not in frame:
        return None
    column = frame[metric].dropna()
    if column.empty:
        return None
    return float(column.max() if mode == "max" else column.min())


def trial_floor(frame, metric: str) -> float | None:
    """The floor a trial reported beside `metric` (floor/<metric>, constant per validation split)."""
    key = f"floor/{metric}"
    if frame is None or key not in frame or frame[key].dropna().empty:
        return None
    return float(frame[key].dropna().iloc[-1])
