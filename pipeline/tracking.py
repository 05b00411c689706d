"""MLflow tracking: runs, metrics, sample images and registered generators. The only mlflow user
(besides `served_generator.py`, the code MLflow runs to serve a generator).

Every call goes through an explicit `MlflowClient(tracking_uri)` and a run id, never MLflow's global
active run, so one process can feed several runs (Tune trials under a parent run) and a restarted
worker reattaches to its run instead of opening a second one. Rank 0 of a training gets a
`Tracker`; every other rank a `NullTracker` whose methods do nothing (`tracker_for`).

Where runs go (`resolve_tracking_uri`): an explicit URI, else $MLFLOW_TRACKING_URI, else an
embedded SQLite store `<home>/mlflow.db` with artifacts under `<home>/mlartifacts/<experiment>`.

A generator is logged as a pyfunc model "from code" (`log_generator`): the model holds the source
of `served_generator.py`, the `models` package, a JSON spec and a safetensors file, so loading it
never unpickles anything. `load_generator` rebuilds the net from the same two artifacts without
pyfunc, for the batch translation job.
"""

import os

# Before mlflow is first imported: it starts its telemetry client at import time. A user may opt
# in with MLFLOW_DISABLE_TELEMETRY=false. (MLflow reads DO_NOT_TRACK only as "true", not "1".)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json
import logging
import math
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from safetensors.torch import load_file, save_file

import models
from models import MODELS
from pipeline import served_generator
from pipeline.config import flatten
from pipeline.evaluation import save_png, to_rgb
from pipeline.run_config import model_config

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): values past them are refused, so we cut them first.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000

SPEC_FILE = "generator.json"
WEIGHTS_FILE = "generator.safetensors"
MODEL_ID_TAG = "transmute.model_id"  # on a model version: the logged model it registers
SERVED_CODE = Path(served_generator.__file__)
MODELS_CODE = Path(models.__file__).parent


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
    tags = {k: _clip(v, MAX_TAG_LENGTH) for k, v in tags.items()}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    _log_params(client, run_id, params)
    return run_id


def create_config_run(cfg, tags: dict) -> str:
    """A run for a RunConfig: its tracking settings, every config key as a param."""
    from pipeline.run_config import flat_params

    t = cfg.tracking
    return create_run(t.uri, t.experiment, t.run_name, params=flat_params(cfg), tags=tags,
                      parent_run_id=t.parent_run_id or None, home=cfg.home)


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


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    batch = [Param(k, _clip(v, MAX_PARAM_LENGTH)) for k, v in params.items()]
    for chunk in _chunks(batch, MAX_PARAMS_PER_BATCH):
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
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict) -> None:
        _log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict) -> None:
        batch = [RunTag(k, _clip(v, MAX_TAG_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(batch, MAX_PARAMS_PER_BATCH):
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

    def log_generator(self, model_name: str, model_config: dict, direction: str, net_name: str,
                      state_dict: dict[str, torch.Tensor], input_example: np.ndarray,
                      registered_name: str | None = None, metrics: dict | None = None,
                      step: int = 0) -> dict:
        """Log one generator as a pyfunc model (from code, no pickles); register it if named.

        `input_example` is float32 N×C×H×W in [-1, 1] (CoGAN: z, N×nz). `metrics` (e.g. eval
        scores) are logged at `step` and linked to the model. Returns model_uri, model_id, name
        and version (the last two None when not registered)."""
        info = {"model": model_name, "config": model_config, "direction": direction, "net": net_name}
        example = np.ascontiguousarray(input_example[:1], dtype=np.float32)  # one row keeps the JSON small
        logged = self.client.create_logged_model(
            self.experiment_id, name=f"generator_{direction}", source_run_id=self.run_id,
            params={k: _clip(v, MAX_PARAM_LENGTH) for k, v in flatten(model_config).items()},
            tags={"transmute.model": model_name, "transmute.net": net_name}, model_type="generator")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = _save_pyfunc(tmp, logged, self.run_id, info, state_dict, example)
                self.client.log_model_artifacts(logged.model_id, model_dir)
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step)])
        if metrics:
            self._log_metrics(metrics, step, model_id=logged.model_id)  # shown on the model too
        result = {"model_uri": f"models:/{logged.model_id}", "model_id": logged.model_id,
                  "name": None, "version": None}
        if registered_name:
            version = register(self.client, registered_name, logged, self.run_id)
            result.update(model_uri=f"models:/{registered_name}/{version}", name=registered_name,
                          version=version)
        return result

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class NullTracker:
    """What ranks other than 0 get: every Tracker method, doing nothing."""

    run_id = None

    def __getattr__(self, name):
        if name.startswith("_") or not hasattr(Tracker, name):
            raise AttributeError(name)
        return _nothing


def _nothing(*args, **kwargs):
    return None


def tracker_for(rank: int, tracking_uri: str | None, run_id: str | None):
    return Tracker(tracking_uri, run_id) if rank == 0 and run_id else NullTracker()


# ----------------------------------------------------------------------------- generators


def _save_pyfunc(tmp: str, logged, run_id: str, info: dict, state_dict: dict, example: np.ndarray) -> str:
    """Write the pyfunc model directory for `logged` (a LoggedModel) and return its path."""
    spec_path, weights_path = os.path.join(tmp, SPEC_FILE), os.path.join(tmp, WEIGHTS_FILE)
    Path(spec_path).write_text(json.dumps(info, indent=2, sort_keys=True))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, weights_path)
    generator = _build(info, weights_path, "cpu")
    model_dir = os.path.join(tmp, "model")
    mlflow.pyfunc.save_model(
        model_dir,
        python_model=str(SERVED_CODE),  # a path, so MLflow stores source instead of a pickle
        artifacts={"spec": spec_path, "weights": weights_path},
        code_paths=[str(MODELS_CODE)],
        signature=_signature(generator, example),
        input_example=example,
        pip_requirements=_requirements(),  # given, so MLflow skips its slow inference subprocess
        mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                           run_id=run_id, model_id=logged.model_id),
    )
    return model_dir


def _signature(generator: "LoadedGenerator", example: np.ndarray) -> ModelSignature:
    """Batch and spatial dims free (-1): the generators are convolutional, so a 32×32 example
    must not lock the served model to 32×32 inputs; channels stay fixed."""
    out = generator(torch.from_numpy(example)).numpy()
    free = lambda shape: (-1, shape[1], *[-1] * (len(shape) - 2))  # noqa: E731
    seeded = generator.spec.multimodal  # params={"z_seed": n} draws a random z
    params = ParamSchema([ParamSpec("z_seed", "long", None)]) if seeded else None
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), free(example.shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), free(out.shape))]),
                          params=params)


def _requirements() -> list[str]:
    torch_version = torch.__version__.split("+")[0]  # drop "+cpu"/"+cu128": the server picks its build
    return [f"torch=={torch_version}", f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}"]


def register(client: MlflowClient, name: str, logged, run_id: str | None = None) -> str:
    """A new version of registered model `name` for `logged` (a LoggedModel); returns the version.

    The source is the model's artifact location, not `models:/<model_id>`: MLflow 3.17's embedded
    SQLite registry resolves a `models:/` source through the GLOBAL tracking URI, not this client's.
    Its versions keep no model id either, so a tag carries it (`get_model_version_metrics`)."""
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                          tags={MODEL_ID_TAG: logged.model_id}, model_id=logged.model_id)
    return str(version.version)


@dataclass
class LoadedGenerator:
    """One generator rebuilt from its artifacts; calling it gives what the pyfunc model serves."""

    model_name: str
    config: Any  # the model's Config dataclass
    direction: str
    net_name: str
    net: torch.nn.Module  # in eval mode
    version: str | None = None
    run_id: str | None = None

    @property
    def spec(self):
        return MODELS[self.model_name]

    def __call__(self, x: torch.Tensor, z_seed: int | None = None) -> torch.Tensor:
        info = {"model": self.model_name, "direction": self.direction, "net": self.net_name}
        return served_generator.generate(self.spec, self.config, info, self.net, x, z_seed)


def _build(info: dict, weights_path: str, device) -> LoadedGenerator:
    spec = MODELS[info["model"]]
    cfg = model_config(info["model"], info["config"])
    net = spec.build_nets(cfg)[info["net"]]
    net.load_state_dict(load_file(weights_path))  # safetensors: tensors only, never pickles
    return LoadedGenerator(info["model"], cfg, info["direction"], info["net"], net.to(device).eval())


def load_generator(uri: str, tracking_uri: str | None = None, device="cpu") -> LoadedGenerator:
    """Rebuild a generator from `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest`,
    `models:/MODEL_ID`, `runs:/RUN_ID/generator_ab`, or a local directory holding generator.json and
    generator.safetensors (a pyfunc model directory or the two files alone)."""
    if os.path.isdir(uri):
        return _build_from_dir(uri, device)
    location, version, run_id = _locate(MlflowClient(tracking_uri), uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        generator = _build_from_dir(local, device)
    generator.version, generator.run_id = version, run_id
    return generator


def _build_from_dir(path: str, device) -> LoadedGenerator:
    """A pyfunc model directory keeps the two files under artifacts/; a plain directory at its top."""
    folder = Path(path, "artifacts") if Path(path, "artifacts", SPEC_FILE).exists() else Path(path)
    if not (folder / SPEC_FILE).exists():
        raise FileNotFoundError(f"no {SPEC_FILE} in {path} or {path}/artifacts: not a logged generator")
    return _build(json.loads((folder / SPEC_FILE).read_text()), str(folder / WEIGHTS_FILE), device)


def _locate(client: MlflowClient, uri: str) -> tuple[str, str | None, str | None]:
    """(artifact location to download, version, run id). The registry is asked through `client`,
    because MLflow's own `models:/` download ignores a tracking URI that is not the global one; an
    alias is resolved once, so the weights and the version reported cannot disagree."""
    if uri.startswith("runs:/"):
        return uri, None, uri.removeprefix("runs:/").split("/")[0]
    if not uri.startswith("models:/"):
        raise ValueError(f"cannot load {uri!r}: expected models:/NAME/VERSION, models:/NAME@ALIAS, "
                         "models:/MODEL_ID, runs:/RUN_ID/PATH or a local directory")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        mv = client.get_model_version_by_alias(*rest.split("@", 1))
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if version == "latest":
            version = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        mv = client.get_model_version(name, str(version))
    else:
        logged = client.get_logged_model(rest)
        return logged.artifact_location, None, logged.source_run_id
    return client.get_model_version_download_uri(mv.name, mv.version), str(mv.version), mv.run_id


# ----------------------------------------------------------------------------- registry helpers


def set_alias(tracking_uri: str, name: str, alias: str, version: str | int) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, str(version))


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run (a Ray Train result carries only the metrics of
    its last checkpoint, not the test metrics reported after it)."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def get_model_version_metrics(tracking_uri: str, name: str, version: str | int) -> dict[str, float]:
    """The metrics logged with a registered version's model (`log_generator(metrics=...)`)."""
    client = MlflowClient(tracking_uri)
    mv = client.get_model_version(name, str(version))
    model_id = mv.model_id or mv.tags.get(MODEL_ID_TAG)
    if not model_id:
        return {}
    return {m.key: m.value for m in client.get_logged_model(model_id).metrics or []}


# ----------------------------------------------------------------------------- lookups: translate, promote


class ModelNotFound(LookupError):
    """A registered model, version or alias that does not exist; the message lists what does."""


def split_model_uri(uri: str) -> tuple[str, str, str]:
    """`models:/NAME/VERSION` -> (NAME, "/", VERSION); `models:/NAME@ALIAS` -> (NAME, "@", ALIAS);
    `models:/MODEL_ID` -> (MODEL_ID, "", "")."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return name, "@", alias
    name, sep, version = rest.partition("/")
    return name, sep, version


def check_model_uri(tracking_uri: str, uri: str) -> None:
    """Raise ModelNotFound, naming what the registry does hold, when `models:/NAME/VERSION`,
    `models:/NAME/latest` or `models:/NAME@ALIAS` points at nothing. Other URIs pass unchecked."""
    if not uri.startswith("models:/"):
        return
    name, sep, ref = split_model_uri(uri)
    if not sep:
        return  # a logged model id: load_generator's own error is clear enough
    client = MlflowClient(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=200))
        raise ModelNotFound(f"no registered model {name!r} at {tracking_uri}; registered models: "
                            f"{', '.join(names) or 'none'}") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = dict(model.aliases or {})
    where = f"model {name!r} (versions {versions or 'none'}, aliases {aliases or 'none'})"
    if sep == "@" and ref not in aliases:
        raise ModelNotFound(f"{where} has no alias {ref!r}: promote a version first, e.g. "
                            f"`python jobs/promote.py {name} --alias {ref} --metric KEY --min VALUE`")
    if sep == "/" and ref == "latest" and not versions:
        raise ModelNotFound(f"{where} has no versions yet")
    if sep == "/" and ref != "latest" and (not ref.isdigit() or int(ref) not in versions):
        raise ModelNotFound(f"{where} has no version {ref!r}")


def resolve_version(tracking_uri: str, name: str, ref: str = "latest") -> str:
    """The version number that `ref` (a version, "latest" or "@alias") names; ModelNotFound if none."""
    uri = f"models:/{name}{ref}" if ref.startswith("@") else f"models:/{name}/{ref}"
    check_model_uri(tracking_uri, uri)
    client = MlflowClient(tracking_uri)
    if ref.startswith("@"):
        return str(client.get_model_version_by_alias(name, ref[1:]).version)
    if ref == "latest":
        return str(max(int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
    return str(int(ref))


def get_model_version_info(tracking_uri: str, name: str, version: str | int) -> dict:
    """{name, version, run_id, aliases, tags} of one registered version."""
    mv = MlflowClient(tracking_uri).get_model_version(name, str(version))
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "aliases": list(mv.aliases or []), "tags": dict(mv.tags or {})}


def get_run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    """A run's params (flat dotted names, as `create_run` logged them)."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.params)


def get_run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """A run's metrics, each at its latest logged value."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def set_model_version_tag(tracking_uri: str, name: str, version: str | int, key: str, value: str) -> None:
    MlflowClient(tracking_uri).set_model_version_tag(name, str(version), key, _clip(value, MAX_TAG_LENGTH))


def model_alias_version(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version an alias points at, None when it is not set."""
    aliases = MlflowClient(tracking_uri).get_registered_model(name).aliases or {}
    return str(aliases[alias]) if alias in aliases else None
