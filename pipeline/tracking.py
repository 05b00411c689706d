"""MLflow tracking: experiments, runs, their params, metrics, tags and artifacts. With
`pipeline.registry` (generators logged as models, the model registry) the only mlflow users
(besides `served_generator.py`, the code MLflow runs to serve a generator).

Every call goes through an explicit `MlflowClient(tracking_uri)` and a run id, never MLflow's global
active run, so one process can feed several runs (Tune trials under a parent run) and a restarted
worker reattaches to its run instead of opening a second one. Rank 0 of a training gets a tracker;
every other rank a `pipeline.session.NullTracker` whose methods do nothing (`open_tracker`).

Where runs go (`resolve_tracking_uri`): an explicit URI, else $MLFLOW_TRACKING_URI, else an
embedded SQLite store `<home>/mlflow.db` with artifacts under `<home>/mlartifacts/<experiment>`.
"""

import logging
import math
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from pipeline.evaluation import save_png, to_rgb

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): values past them are refused, so we cut them first.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000


# ----------------------------------------------------------------------------- stores and runs


def resolve_tracking_uri(uri: str | None, home: str) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else `sqlite:///<abs home>/mlflow.db`.

    `home` is made absolute so that a job running in an unpacked copy of the working dir
    (`ray job submit --working-dir .`) still writes to the user's store."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + os.path.join(os.path.abspath(home), "mlflow.db")


def default_artifact_location(home: str, experiment: str) -> str:
    return Path(os.path.abspath(home), "mlartifacts", experiment).as_uri()


def _artifact_location(tracking_uri: str, experiment: str, home: str | None) -> str | None:
    """Artifacts beside a local SQLite store; a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    home = home or os.path.dirname(tracking_uri.removeprefix("sqlite:///")) or "."
    return default_artifact_location(home, experiment)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as e:  # another trial created it between our two calls
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(f"experiment {name!r} is deleted: restore it "
                              f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
                              "or choose another name")
    return experiment.experiment_id


def create_run(tracking_uri: str, experiment: str, run_name: str, *, params: dict, tags: dict,
               parent_run_id: str | None = None, home: str | None = None) -> str:
    """Create a RUNNING run (nested under `parent_run_id` if given), log its params, return its id.

    `params` are flat dotted names (`pipeline.config.flatten`); long values are cut, not refused."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, _artifact_location(tracking_uri, experiment, home))
    tags = {k: clip(v, MAX_TAG_LENGTH) for k, v in tags.items()}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    _log_params(client, run_id, params)
    return run_id


def create_config_run(cfg, tags: dict, run_name: str | None = None) -> str:
    """A run for a RunConfig: its tracking settings, every config key as a param. `run_name`: the
    name shown in the UI, when it differs from the config's (a trial named by its values)."""
    from pipeline.run_config import flat_params

    t = cfg.tracking
    return create_run(t.uri, t.experiment, run_name or t.run_name, params=flat_params(cfg), tags=tags,
                      parent_run_id=t.parent_run_id or None, home=cfg.home)


def describe(tracking_uri: str, run_id: str, text: str) -> None:
    """The run's description (the text the UI shows on the run page, the `mlflow.note.content` tag)."""
    MlflowClient(tracking_uri).set_tag(run_id, MLFLOW_RUN_NOTE, clip(text, MAX_TAG_LENGTH))


class IngestedDataset(MetaDataset):
    """An ingested dataset as MLflow knows datasets: its manifest's content hash as the digest and
    the split counts as the profile; no data is uploaded (the run points at its source)."""

    def __init__(self, source, name: str, digest: str, counts: dict):
        self._counts = counts
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._counts

    def to_dict(self) -> dict[str, str]:
        import json

        return {**super().to_dict(), "profile": json.dumps(self._counts, sort_keys=True)}


def dataset_entity(manifest: dict, name: str):
    """The MLflow dataset of an ingest `manifest`: named `name`, digest = content hash, profile =
    {split: {domain: images}}, source = where it was ingested from (a public URI: the manifest
    keeps no credentials)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # a local path resolves as two equal source kinds; either will do
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(manifest.get("source") or name))
    digest = str(manifest.get("content_hash", ""))[:36] or None  # MLflow caps digests at 36 characters
    return IngestedDataset(source, name, digest, manifest.get("counts", {}))._to_mlflow_entity()


DATASET_TRIES = 3


def log_dataset(tracking_uri: str, run_id: str, manifest: dict, name: str, context: str = "training") -> None:
    """Attach the ingested dataset to the run (its Datasets panel, `mlflow.log_input`).

    Why the retry: two runs of one experiment attaching the same dataset at the same moment (a
    search's trials) race on MLflow's datasets table, whose key is (experiment, name, digest). The
    loser gets BAD_REQUEST "UNIQUE constraint failed" (SQLite) or "duplicate key" (PostgreSQL),
    which MLflow's client does not retry. By then the dataset row exists, so one more try links the
    run to it (`log_inputs` is idempotent for a run already linked)."""
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    dataset = DatasetInput(dataset_entity(manifest, name), tags)
    client = MlflowClient(tracking_uri)
    for attempt in range(1, DATASET_TRIES + 1):
        try:
            client.log_inputs(run_id, datasets=[dataset])
            return
        except MlflowException:
            if attempt == DATASET_TRIES:
                raise
            time.sleep(0.2 * attempt)


def find_run(tracking_uri: str, experiment: str, tags: dict) -> str | None:
    """The id of the run in `experiment` carrying all these tag values, if there is one."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([found.experiment_id], filter_string=where, max_results=1)
    return runs[0].info.run_id if runs else None


def runs_under(tracking_uri: str, parent_run_id: str) -> list:
    """The child runs of a parent run (a search's trials)."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")


def clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    batch = [Param(k, clip(v, MAX_PARAM_LENGTH)) for k, v in params.items()]
    for chunk in chunks(batch, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)



# ----------------------------------------------------------------------------- trackers


class Tracker:
    """Logs to one existing run. Reattaching (restart, resume) sets an ended run RUNNING again."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        run = self.client.get_run(run_id)  # raises if there is no such run: never creates one
        self.experiment_id = run.info.experiment_id
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_metrics(metrics, step)

    def _log_metrics(self, metrics: dict, step: int, model_id: str | None = None) -> None:
        """One batched call; a NaN/inf value is left out (with a warning) rather than failing."""
        now, values = int(time.time() * 1000), {k: float(v) for k, v in metrics.items()}
        skipped = [k for k, v in values.items() if not math.isfinite(v)]
        if skipped:
            log.warning("step %d: not logging non-finite %s", step, ", ".join(skipped))
        batch = [Metric(k, v, now, int(step), model_id=model_id)
                 for k, v in values.items() if math.isfinite(v)]
        for chunk in chunks(batch, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict) -> None:
        _log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict) -> None:
        batch = [RunTag(k, clip(v, MAX_TAG_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(batch, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_image(self, image: torch.Tensor, artifact_file: str) -> None:
        """A C×H×W tensor in [-1, 1] (C = 1 or 3) as PNG at `artifact_file` (`samples/x.png`)."""
        folder, name = posixpath.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_png(to_rgb(image.detach().float().cpu()[None])[0], os.path.join(tmp, name))
            self.client.log_artifact(self.run_id, path, folder or None)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def fail_if_running(tracking_uri: str, run_id: str) -> bool:
    """Mark a RUNNING run FAILED; any other status is left alone (a resume that failed before it
    reattached must not turn a FINISHED run into a FAILED one). Returns whether it marked it."""
    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, "FAILED")
    return True


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run (a Ray Train result carries only the metrics of
    its last checkpoint, not the test metrics reported after it)."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def get_run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    """A run's params (flat dotted names, as `create_run` logged them)."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.params)


def attach_dataset(cfg, run_id: str, manifest: dict) -> None:
    """The run's dataset (name, content hash, split counts, source) and a description that names it."""
    name = cfg.data.dataset or os.path.basename(cfg.data.path.rstrip("/")) or "dataset"
    log_dataset(cfg.tracking.uri, run_id, manifest, name)
    describe(cfg.tracking.uri, run_id, f"{cfg.model_name} with recipe {cfg.recipe or '(none)'} on {name} "
             f"({manifest.get('content_hash', '')[:12]}; {split_summary(manifest)})")


def split_summary(manifest: dict) -> str:
    """"train 8+8, val 4+4, test 4+4": images per domain in each split."""
    return ", ".join(f"{split} {'+'.join(str(n) for n in counts.values())}"
                     for split, counts in manifest.get("counts", {}).items())

