"""Generators as MLflow models, and the model registry: logging, registering, locating, loading.

A generator is logged as a pyfunc model "from code" (`ModelTracker.log_generator`): the model holds
the source of `served_model.py` (the entry MLflow runs), `served_generator.py`,
`generator_artifact.py` and the `models` package, and the generator's artifact (generator.json and
generator.safetensors, `pipeline.generator_artifact`), so loading it never unpickles anything.
`load_generator` reads the same artifact without pyfunc, for the batch translation job. Runs and
metrics are `pipeline.tracking`'s.
"""

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import safetensors
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import models
from pipeline import generator_artifact, served_generator
from pipeline.config import flatten
from pipeline.generator_artifact import CONFIG_FILE, WEIGHTS_FILE, GeneratorArtifact
from pipeline.model_ref import ModelRef, parse_model_ref
from pipeline.tracking import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, Tracker, clip, get_run_params

SPEC_FILE = CONFIG_FILE  # the name tests and older callers use
MODEL_ID_TAG = "transmute.model_id"  # on a model version: the logged model it registers
SERVED_ENTRY = Path(__file__).with_name("served_model.py")  # MLflow runs it: set_model(...)
SERVED_CODE = [Path(served_generator.__file__), Path(generator_artifact.__file__),
               Path(models.__file__).parent]


class ModelTracker(Tracker):
    """A run's tracker that also logs its generators as models (and registers them)."""

    def log_generator(self, artifact: GeneratorArtifact, input_example: np.ndarray,
                      registered_name: str | None = None, metrics: dict | None = None,
                      step: int = 0) -> dict:
        """Log one generator as a pyfunc model (from code, no pickles); register it if named.

        `input_example` is float32 N×C×H×W in [-1, 1] (CoGAN: z, N×nz). `metrics` (e.g. eval
        scores) are logged at `step` and linked to the model. Returns model_uri, model_id, name and
        version (the last two None when not registered)."""
        example = np.ascontiguousarray(input_example[:1], dtype=np.float32)  # one row keeps the JSON small
        spec = artifact.to_json()
        logged = self.client.create_logged_model(
            self.experiment_id, name=f"generator_{artifact.direction}", source_run_id=self.run_id,
            params={k: clip(v, MAX_PARAM_LENGTH) for k, v in flatten(spec["config"]).items()},
            tags={"transmute.model": artifact.model_name, "transmute.net": artifact.net_name},
            model_type="generator")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = _save_pyfunc(tmp, logged, self.run_id, artifact, example)
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


def _save_pyfunc(tmp: str, logged, run_id: str, artifact: GeneratorArtifact, example: np.ndarray) -> str:
    """Write the pyfunc model directory for `logged` (a LoggedModel) and return its path."""
    folder = artifact.export(os.path.join(tmp, "generator"))
    model_dir = os.path.join(tmp, "model")
    mlflow.pyfunc.save_model(
        model_dir,
        python_model=str(SERVED_ENTRY),  # a path, so MLflow stores source instead of a pickle
        artifacts={"spec": os.path.join(folder, CONFIG_FILE), "weights": os.path.join(folder, WEIGHTS_FILE)},
        code_paths=[str(p) for p in SERVED_CODE],
        signature=_signature(artifact, example),
        input_example=example,
        pip_requirements=_requirements(),  # given, so MLflow skips its slow inference subprocess
        mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                           run_id=run_id, model_id=logged.model_id),
    )
    return model_dir


def _signature(artifact: GeneratorArtifact, example: np.ndarray) -> ModelSignature:
    """Batch and spatial dims free (-1): the generators are convolutional, so a 32×32 example
    must not lock the served model to 32×32 inputs; channels stay fixed."""
    out = served_generator.generate(artifact, artifact.build(), torch.from_numpy(example)).numpy()
    free = lambda shape: (-1, shape[1], *[-1] * (len(shape) - 2))  # noqa: E731
    seeded = artifact.spec.multimodal  # params={"z_seed": n} draws a random z
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


# ----------------------------------------------------------------------------- locating and loading


@dataclass(frozen=True)
class Located:
    """What a reference points at: where its files are, and (registered) which version of what run."""

    ref: ModelRef
    location: str  # artifact URI to download, or the local folder
    version: str | None = None
    run_id: str | None = None


def locate(ref: ModelRef, tracking_uri: str | None = None) -> Located:
    """One registry round trip for what `ref` names (a folder needs none). The registry is asked
    through a client of `tracking_uri`, because MLflow's own `models:/` download ignores a tracking
    URI that is not the global one; an alias is resolved once, so the weights and the version
    reported cannot disagree. A name, version or alias that does not exist raises ModelNotFound
    naming what the registry holds."""
    if ref.kind in ("folder", "checkpoint"):
        return Located(ref, ref.uri)
    if ref.kind == "run":
        return Located(ref, ref.uri, None, ref.name)
    client = MlflowClient(tracking_uri)
    if ref.kind == "logged":
        logged = client.get_logged_model(ref.name)
        return Located(ref, logged.artifact_location, None, logged.source_run_id)
    try:
        mv = _model_version(client, ref)
    except (MlflowException, LookupError):
        check_model_uri(tracking_uri, ref.uri)  # raises ModelNotFound with what exists
        raise
    return Located(ref, mv.source, str(mv.version), mv.run_id)


def _model_version(client: MlflowClient, ref: ModelRef):
    if ref.kind == "alias":
        return client.get_model_version_by_alias(ref.name, ref.ref)
    if ref.kind == "latest":
        versions = client.search_model_versions(f"name = '{ref.name}'")
        if not versions:
            raise LookupError(f"{ref.name} has no versions")
        return max(versions, key=lambda v: int(v.version))
    return client.get_model_version(ref.name, ref.ref)


def load_generator(ref: str | ModelRef | Located, tracking_uri: str | None = None) -> tuple[GeneratorArtifact,
                                                                                            Located]:
    """The generator `ref` names (any form of `pipeline.model_ref` but a checkpoint) and where it
    was found. A generator logged before its artifact recorded the training image size and
    swap_ab takes them from the run that logged it."""
    located = ref if isinstance(ref, Located) else locate(
        ref if isinstance(ref, ModelRef) else parse_model_ref(ref), tracking_uri)
    if located.ref.kind == "folder":
        artifact = GeneratorArtifact.load(located.location)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=located.location, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
            artifact = GeneratorArtifact.load(local)
    if (artifact.size is None or artifact.swap_ab is None) and located.run_id:
        artifact = _from_run_params(artifact, get_run_params(tracking_uri, located.run_id))
    return artifact, located


def _from_run_params(artifact: GeneratorArtifact, params: dict[str, str]) -> GeneratorArtifact:
    """An older generator.json's missing fields from its run's string params, read as before."""
    size = int(params.get("data.crop_size") or 0) or int(params.get("data.load_size") or 0) or None
    swap_ab = params.get("data.swap_ab") == "True"
    return replace(artifact, size=artifact.size if artifact.size is not None else size,
                   swap_ab=artifact.swap_ab if artifact.swap_ab is not None else swap_ab)


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


def check_model_uri(tracking_uri: str, uri: str) -> None:
    """Raise ModelNotFound, naming what the registry does hold, when `models:/NAME/VERSION`,
    `models:/NAME/latest` or `models:/NAME@ALIAS` points at nothing. Other URIs pass unchecked."""
    parsed = parse_model_ref(uri)
    if not parsed.registered:
        return  # a logged model id, run or folder: loading's own error is clear enough
    name, ref = parsed.name, parsed.ref
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
    if parsed.kind == "alias" and ref not in aliases:
        raise ModelNotFound(f"{where} has no alias {ref!r}: promote a version first, e.g. "
                            f"`python jobs/promote.py {name} --alias {ref} --metric KEY --min VALUE`")
    if parsed.kind == "latest" and not versions:
        raise ModelNotFound(f"{where} has no versions yet")
    if parsed.kind == "version" and (not ref.isdigit() or int(ref) not in versions):
        raise ModelNotFound(f"{where} has no version {ref!r}")


def resolve_version(tracking_uri: str, name: str, ref: str = "latest") -> str:
    """The version number that `ref` (a version, "latest" or "@alias") names; ModelNotFound if none."""
    uri = f"models:/{name}{ref}" if ref.startswith("@") else f"models:/{name}/{ref}"
    return locate(parse_model_ref(uri), tracking_uri).version


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
