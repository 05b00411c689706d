"""Launching a run, shared by the jobs: name it (or find the run it resumes), make sure its dataset is
ingested, start its MLflow run, start Ray, then train with or without Ray.

jobs/train.py is these steps in order; jobs/tune.py and jobs/norm_study.py use the ones they need,
jobs/translate.py only `init_ray`. Errors a user can fix (no dataset, nothing to resume) end the
command with SystemExit and a message that says what to run.
"""

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import time
from urllib.parse import unquote, urlsplit

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.run_config import DEFAULT_HOME, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (or --working-dir)
DATASETS = os.environ.get("TRANSMUTE_DATASETS", os.path.join(os.path.dirname(ROOT), "shared", "datasets"))

# Telemetry stays off unless a user opts in (e.g. MLFLOW_DISABLE_TELEMETRY=false): MLflow starts its
# telemetry client when it is first imported, so entry points call `quiet()` before anything does.
# NOISE is what a user did not ask to read: Ray Data's progress bars (thousands of lines per run),
# MLflow's INFO lines and artifact-download bars, Ray's INFO lines; `-v/--verbose` keeps them.
# Both reach Ray workers through the environment (pipeline.loop.forwarded_env forwards QUIET's keys).
NOISE = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
         "MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_LOG_TO_DRIVER_EVENT_LEVEL": "WARNING"}
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1", **NOISE}


def quiet(verbose: bool = False) -> None:
    """Telemetry off, and unless `verbose`, Ray's and MLflow's own chatter (NOISE) too; a value
    the user set in the environment wins."""
    for key, value in QUIET.items():
        if not (verbose and key in NOISE):
            os.environ.setdefault(key, value)


def verbose_flag(p) -> None:
    """-v/--verbose: a job's parser option bringing back what `quiet` silences."""
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's and MLflow's own INFO lines and progress bars (off by default)")


def noisy() -> bool:
    """Whether Ray and MLflow may chatter: `quiet` left their noise on (--verbose, or no quiet())."""
    return os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"


def ray_log_level() -> int:
    """The level of Ray's own log lines in this process: INFO with --verbose, else WARNING."""
    import logging

    return logging.INFO if noisy() else logging.WARNING


# ----------------------------------------------------------------------------- data


def ensure_dataset(cfg: RunConfig) -> dict:
    """The dataset's manifest, checked to fill the run's batches; ingests the recipe's known source
    on first use."""
    manifest = _dataset(cfg)
    check_batches_fit(cfg, manifest)
    return manifest


def check_batches_fit(cfg: RunConfig, manifest: dict) -> None:
    """ConfigError, before Ray or MLflow start, when the training split cannot fill one batch on
    each worker (the loop would stop on it after both had started; see pipeline.batches)."""
    from pipeline.data import split_counts

    split = cfg.data.train_split
    try:
        largest = max(split_counts(manifest, split).values(), default=0)
    except KeyError:
        raise ConfigError(f"data.train_split={split} is not allowed: one of {', '.join(manifest['counts'])} "
                          f"(the splits of {storage.public_uri(cfg.data.path)})") from None
    workers = cfg.scaling.num_workers
    if largest // workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not allowed: at most {largest // workers}, the "
            f"{split} split of {storage.public_uri(cfg.data.path)} holds {largest} images per domain "
            f"for {workers} worker(s)"
        )


def _dataset(cfg: RunConfig) -> dict:
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


# ----------------------------------------------------------------------------- names, resume


def run_name(cfg: RunConfig) -> str:
    m = cfg.model
    parts = [
        cfg.recipe or cfg.model_name,
        getattr(m, "norm", ""),
        f"w{cfg.scaling.num_workers}",
        time.strftime("%Y%m%d-%H%M%S"),
    ]
    return "-".join(p for p in parts if p)


def previous_run(cfg: RunConfig, name: str) -> dict:
    """run_id and progress of an earlier run, from its newest checkpoint's meta.json (local or s3://;
    Ray Train then restores the same run folder from its own record of that checkpoint)."""
    from pipeline.checkpoint import latest_meta

    folder = storage.join(cfg.storage.path, name)
    meta = latest_meta(folder, cfg.storage.endpoint or None)
    if meta is None:
        raise SystemExit(f"error: --resume {name}: no complete checkpoint under {folder}")
    return meta


def name_run(cfg: RunConfig, resume: str | None) -> RunConfig:
    """The config with its run name: the resumed run's (and its MLflow run id), the configured
    one, or a new one from the recipe, norm, workers and time."""
    if resume:
        meta = previous_run(cfg, resume)
        return dataclasses.replace(
            cfg, tracking=dataclasses.replace(cfg.tracking, run_name=resume, run_id=meta.get("run_id", ""))
        )
    return dataclasses.replace(
        cfg, tracking=dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or run_name(cfg))
    )


# ----------------------------------------------------------------------------- tracking


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or os.environ.get("TRANSMUTE_GIT_COMMIT", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TRANSMUTE_GIT_COMMIT", "unknown")


def tracking_uri(explicit: str | None) -> str:
    """The MLflow URI a command without a run config uses: `explicit`, else $MLFLOW_TRACKING_URI,
    else the sqlite store under $TRANSMUTE_HOME (default ~/.transmute), as a training run's."""
    from pipeline.tracking import resolve_tracking_uri

    home = os.environ.get("TRANSMUTE_HOME", DEFAULT_HOME)
    return keep_credentials_out(resolve_tracking_uri(explicit, os.path.expanduser(home)))


def with_tracking_uri(cfg: RunConfig) -> RunConfig:
    """The config with its MLflow URI resolved (the configured one, $MLFLOW_TRACKING_URI, or the
    sqlite store under home), so that Ray workers log to the store this process chose. Credentials
    in it move to the environment (`keep_credentials_out`): the config is logged and stored."""
    from pipeline.tracking import resolve_tracking_uri

    uri = keep_credentials_out(resolve_tracking_uri(cfg.tracking.uri or None, cfg.home))
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=uri))


def keep_credentials_out(uri: str) -> str:
    """`uri` without its credentials, which never enter a config, param, checkpoint or printed line.

    An http(s) URI's user:password@ moves into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    of this process (unless already set: the environment wins), where MLflow reads them; a local Ray
    started afterwards passes them on to its workers. Other credentials (a database URI's password, a
    token in the query) have no such place: refused, saying where to put them instead."""
    public = storage.public_uri(uri)
    if public == uri:
        return uri
    parts = urlsplit(uri)
    bare = uri.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)  # without user:password@
    if storage.public_uri(bare) == bare:  # the userinfo was the only secret
        if parts.scheme in ("http", "https"):
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
            return bare
        if parts.password is None:
            return uri  # a user name alone is no secret, and a database URI may need it
    raise ConfigError(  # exit 2 through pipeline.cli
        f"the MLflow tracking URI {public} carries credentials; keep them out of the URI: set "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) for a server, "
        "PGPASSWORD or ~/.pgpass for PostgreSQL")


def start_tracking(cfg: RunConfig, manifest: dict) -> RunConfig:
    """The config with a resolved MLflow URI and its run id: a new run tagged with its dataset,
    commit and checkpoint folder, unless it resumes one."""
    from pipeline.tracking import attach_dataset, create_config_run

    cfg = with_tracking_uri(cfg)
    if cfg.tracking.run_id:
        return cfg
    tags = {
        "model": cfg.model_name,
        "recipe": cfg.recipe,
        "dataset": cfg.data.dataset,
        "dataset.content_hash": manifest.get("content_hash", ""),
        "dataset.path": storage.public_uri(cfg.data.path),
        "git.commit": git_commit(),
        "storage.path": storage.public_uri(storage.join(cfg.storage.path, cfg.tracking.run_name)),
    }
    run_id = create_config_run(cfg, tags)
    attach_dataset(cfg, run_id, manifest)
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_id=run_id))


def mark_failed(cfg: RunConfig) -> None:
    """FAILED for a run that was RUNNING (a new one, or a resume that reattached to it); a finished
    run whose resume failed before training keeps its status."""
    from pipeline.tracking import fail_if_running

    try:
        fail_if_running(cfg.tracking.uri, cfg.tracking.run_id)
    except Exception as e:  # the original error matters more than this one
        print(f"warning: could not mark MLflow run {cfg.tracking.run_id} failed: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------- Ray, training


def init_ray(address: str | None, cpus: float, progress: bool | None = None):
    """Connect to the Ray at `address` (else $RAY_ADDRESS), or start a local one with at least
    `cpus` logical CPUs (the job's workers or actors plus room for Ray Data's tasks beside them).
    `progress` switches Ray Data's progress bars; None: as `quiet` chose (off unless --verbose)."""
    import ray
    from ray.data import DataContext

    if progress is None:  # quiet() decided: bars only with --verbose
        progress = noisy()
    DataContext.get_current().enable_progress_bars = progress
    DataContext.get_current().enable_operator_progress_bars = progress
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=ray_log_level())
    else:
        with local_ray_env():
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), include_dashboard=False,
                     logging_level=ray_log_level())
    return ray


# What a local Ray that a job starts itself changes from Ray's defaults (a value the user set wins).
# - RAY_worker_niceness=0: Ray's 15 is meant for cluster nodes, where it keeps the raylet responsive
#   under load; on a laptop or a shared box it hands the training worker the last share of the cores
#   whenever anything else in the job's session runs (README "Ray Train").
# - RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: Train V2's watcher actor polls for nodes being drained
#   (spot preemption); a local single-node Ray is never drained, and the actor's wake-ups cost about
#   1% of a core that a 2-worker training waits for at every all-reduce (benchmarks/train_overhead.py:
#   +9.1% against +10.4% with it, 4 repeats each, 2 cores).
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def local_ray_env():
    """Around the ray.init that starts a local Ray: LOCAL_RAY_ENV's values for the variables the
    user has not set. The raylet reads them when it starts and its workers inherit them, so the
    driver's environment is put back afterwards."""
    added = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def training_cpus(cfg: RunConfig) -> float:
    """Logical CPUs a local Ray needs for this training: its workers and two for Ray Data's reads."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2


def train(cfg: RunConfig, no_ray: bool = False, address: str | None = None) -> dict:
    """Run the training described by a resolved, named, tracked config; returns final metrics."""
    if no_ray:
        from pipeline.loop import run_plain

        return run_plain(cfg)
    from pipeline.loop import ray_trainer

    init_ray(address, training_cpus(cfg))
    result = ray_trainer(cfg).fit()
    if result.error:
        raise result.error
    return result.metrics or {}
