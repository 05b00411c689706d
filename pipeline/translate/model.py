"""Which generator translates: a registered or logged model, or a training checkpoint, loaded on
the driver into its `GeneratorArtifact` (config, direction, training image size, weights), which
workers build the net from without MLflow or the checkpoint, and its `ModelInfo` (lineage)."""

import hashlib
import os
from dataclasses import dataclass, replace

import torch

from pipeline.generator_artifact import GeneratorArtifact
from pipeline.model_ref import ModelRef, checkpoint_folder, parse_model_ref


@dataclass
class ModelInfo:
    """Who made an output: recorded with every output; `key` decides what a rerun may reuse."""

    name: str
    version: str | None
    run_id: str | None
    uri: str  # as asked for, e.g. models:/facades-ab@production
    key: str  # these weights: models:/NAME/VERSION, or weights:<sha256 of the tensors>


def load_model(ref: str, tracking_uri: str | None = None, direction: str | None = None,
               size: int | None = None) -> tuple[GeneratorArtifact, ModelInfo]:
    """The generator `ref` names (any form of `pipeline.model_ref`: a registered or logged model, an
    exported folder, a training checkpoint, where `direction` picks the generator) and who made it.
    `size` is used only for a model that does not record its training size."""
    parsed = parse_model_ref(ref)
    if parsed.kind == "checkpoint":
        artifact, info = _from_checkpoint(checkpoint_folder(parsed.uri), direction)
    else:
        artifact, info = _from_tracking(parsed, tracking_uri)
    if direction and direction != artifact.direction:
        raise ValueError(f"model {ref} translates {artifact.direction!r}, not --direction {direction!r}: "
                         f"use the model registered for {direction!r} (e.g. its name ending -{direction})")
    fixed = artifact.spec.image_size(artifact.config)
    if fixed:  # a generator from z (CoGAN) makes the one size it is built for
        return replace(artifact, size=fixed), info
    if artifact.size and size and size != artifact.size:
        raise ValueError(f"model {ref} was trained at {artifact.size}px; --size {size} does not fit it "
                         "(inputs of any size are resized to the model's size: drop --size)")
    if not (artifact.size or size):
        raise ValueError(f"model {ref} records no training image size (no MLflow run or config): "
                         "pass --size")
    return replace(artifact, size=artifact.size or size), info


def _from_checkpoint(folder: str, direction: str | None) -> tuple[GeneratorArtifact, ModelInfo]:
    from pipeline.checkpoint import export_generator, read_meta_if_any

    artifact, run_name = export_generator(folder, direction)
    info = ModelInfo(run_name or os.path.basename(os.path.dirname(folder)), os.path.basename(folder),
                     read_meta_if_any(folder).get("run_id"), os.path.abspath(folder),
                     weights_key(artifact.weights))
    return artifact, info


def _from_tracking(ref: ModelRef, tracking_uri: str | None) -> tuple[GeneratorArtifact, ModelInfo]:
    from pipeline import registry

    artifact, located = registry.load_generator(registry.locate(ref, tracking_uri), tracking_uri)
    registered = ref.registered and located.version is not None
    name = ref.name if registered else ref.uri
    key = f"models:/{name}/{located.version}" if registered else weights_key(artifact.weights)
    return artifact, ModelInfo(name, located.version, located.run_id, ref.uri, key)


def weights_key(weights: dict) -> str:
    """The identity of unregistered weights: sha256 over the sorted tensors."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + digest.hexdigest()[:16]
