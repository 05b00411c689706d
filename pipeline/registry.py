"""Generators as MLflow models, and the model registry: logging, registering, loading, looking up.

A generator is logged as a pyfunc model "from code" (`ModelTracker.log_generator`): the model holds
the source of `served_generator.py`, the `models` package, a JSON spec and a safetensors file, so
loading it never unpickles anything. `load_generator` rebuilds the net from the same two artifacts
without pyfunc, for the batch translation job. Runs and metrics are `pipeline.tracking`'s.
"""

import os

# Before mlflow is first imported (see pipeline.tracking): no telemetry unless a user opts in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from safetensors.torch import load_file, save_file

import models
from models import MODELS
from pipeline import served_generator
from pipeline.config import flatten
from pipeline.run_config import model_config
from pipeline.tracking import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, Tracker, clip

SPEC_FILE = "generator.json"
WEIGHTS_FILE = "generator.safetensors"
MODEL_ID_TAG = "transmute.model_id"  # on a model version: the logged model it registers
SERVED_CODE = Path(served_generator.__file__)
MODELS_CODE = Path(models.__file__).parent


class ModelTracker(Tracker):
    """A run's tracker that also logs its generators as models (and registers them)."""

    def log_generator(self, info: dict, state_dict: dict[str, torch.Tensor], input_example: np.ndarray,
                      registered_name: str | None = None, metrics: dict | None = None,
                      step: int = 0) -> dict:
        """Log one generator as a pyfunc model (from code, no pickles); register it if named.

        `info` is its spec: {"model", "config" (the model's config as a dict), "direction",
        "net"}. `input_example` is float32 N×C×H×W in [-1, 1] (CoGAN: z, N×nz). `metrics` (e.g.
        eval scores) are logged at `step` and linked to the model. Returns model_uri, model_id,
        name and version (the last two None when not registered)."""
        model_name, model_config = info["model"], info["config"]
        example = np.ascontiguousarray(input_example[:1], dtype=np.float32)  # one row keeps the JSON small
        logged = self.client.create_logged_model(
            self.experiment_id, name=f"generator_{info['direction']}", source_run_id=self.run_id,
            params={k: clip(v, MAX_PARAM_LENGTH) for k, v in flatten(model_config).items()},
            tags={"transmute.model": model_name, "transmute.net": info["net"]}, model_type="generator")
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



def set_model_version_tag(tracking_uri: str, name: str, version: str | int, key: str, value: str) -> None:
    MlflowClient(tracking_uri).set_model_version_tag(name, str(version), key, clip(value, MAX_TAG_LENGTH))


def model_alias_version(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version an alias points at, None when it is not set."""
    aliases = MlflowClient(tracking_uri).get_registered_model(name).aliases or {}
    return str(aliases[alias]) if alias in aliases else None
