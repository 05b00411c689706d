"""Which generator translates: a registered or logged model, or a training checkpoint, loaded on
the driver into a `ModelPayload` (weights, config, training image size and lineage) that workers
rebuild the net from without MLflow or the checkpoint."""

import hashlib
import json
import os
from dataclasses import dataclass, replace

import torch

from models import MODELS
from pipeline.config import from_dict, to_dict


@dataclass
class ModelInfo:
    """Who made an output: recorded with every output; `key` decides what a rerun may reuse."""

    name: str
    version: str | None
    run_id: str | None
    uri: str  # as asked for, e.g. models:/facades-ab@production
    key: str  # these weights: models:/NAME/VERSION, or weights:<sha256 of the tensors>


@dataclass
class ModelPayload:
    """Everything a worker needs to rebuild the generator, without MLflow or the checkpoint."""

    model_name: str
    config: dict
    direction: str
    net_name: str
    weights: dict  # state dict, CPU tensors
    info: ModelInfo
    size: int | None  # the training image size (crop, else load size); None: not recorded
    swap_ab: bool = False  # trained on the right half of aligned pairs as domain a


def load_model(ref: str, tracking_uri: str | None = None, direction: str | None = None,
               size: int | None = None) -> ModelPayload:
    """A registered or logged generator (`models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `runs:/RUN/generator_ab`, a directory holding generator.json) or a training checkpoint (a
    checkpoint folder or a run folder of them: `direction` picks its generator). `size` is used
    only for a model that does not record its training size."""
    if os.path.isdir(ref) and _checkpoint_folder(ref):
        payload = _from_checkpoint(_checkpoint_folder(ref), direction)
    else:
        payload = _from_tracking(ref, tracking_uri)
    if direction and direction != payload.direction:
        raise ValueError(f"model {ref} translates {payload.direction!r}, not --direction {direction!r}: "
                         f"use the model registered for {direction!r} (e.g. its name ending -{direction})")
    spec = MODELS[payload.model_name]
    fixed = spec.image_size(from_dict(spec.Config, payload.config))
    if fixed:  # a generator from z (CoGAN) makes the one size it is built for
        return replace(payload, size=fixed)
    if payload.size and size and size != payload.size:
        raise ValueError(f"model {ref} was trained at {payload.size}px; --size {size} does not fit it "
                         "(inputs of any size are resized to the model's size: drop --size)")
    if not (payload.size or size):
        raise ValueError(f"model {ref} records no training image size (no MLflow run or config): "
                         "pass --size")
    return replace(payload, size=payload.size or size)


def _checkpoint_folder(path: str) -> str | None:
    from pipeline.checkpoint import NETS, latest_local

    return path if os.path.exists(os.path.join(path, NETS)) else latest_local(path)


def _from_checkpoint(folder: str, direction: str | None) -> ModelPayload:
    from pipeline.checkpoint import META, load_nets, net_tensors, read_config_json
    from pipeline.run_config import from_json

    cfg = from_json(read_config_json(folder))
    spec = MODELS[cfg.model_name]
    direction = direction or spec.directions[0]
    if direction not in spec.directions:
        raise ValueError(f"checkpoint {folder} ({cfg.model_name}) has directions {spec.directions}, "
                         f"not {direction!r}")
    nets = spec.build_nets(cfg.model)
    load_nets(folder, nets)
    weights = net_tensors(nets[spec.generator_for[direction]])
    meta_path = os.path.join(folder, META)
    meta = json.loads(open(meta_path).read()) if os.path.exists(meta_path) else {}
    info = ModelInfo(cfg.tracking.run_name or os.path.basename(os.path.dirname(folder)),
                     os.path.basename(folder), meta.get("run_id"), os.path.abspath(folder),
                     weights_key(weights))
    size = cfg.data.crop_size or cfg.data.load_size or None
    return ModelPayload(cfg.model_name, to_dict(cfg.model), direction, spec.generator_for[direction],
                        weights, info, size, cfg.data.swap_ab)


def _from_tracking(ref: str, tracking_uri: str | None) -> ModelPayload:
    from pipeline import registry, tracking

    registry.check_model_uri(tracking_uri, ref)
    generator = registry.load_generator(ref, tracking_uri)
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.net.state_dict().items()}
    registered = ref.startswith("models:/") and generator.version is not None
    name = registry.split_model_uri(ref)[0] if registered else ref
    key = f"models:/{name}/{generator.version}" if registered else weights_key(weights)
    params = tracking.get_run_params(tracking_uri, generator.run_id) if generator.run_id else {}
    size = int(params.get("data.crop_size") or 0) or int(params.get("data.load_size") or 0) or None
    info = ModelInfo(name, generator.version, generator.run_id, ref, key)
    return ModelPayload(generator.model_name, to_dict(generator.config), generator.direction,
                        generator.net_name, weights, info, size, params.get("data.swap_ab") == "True")


def weights_key(weights: dict) -> str:
    """The identity of unregistered weights: sha256 over the sorted tensors."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + digest.hexdigest()[:16]


def model_channels(model_name: str, cfg, direction: str) -> tuple[int | None, int]:
    """(input channels, output channels); a generator of pairs (CoGAN) takes no image and writes
    a|b side by side."""
    a, b = cfg.channels_a, cfg.channels_b
    if not MODELS[model_name].takes_input:
        return None, a if a == b else 3
    return (a, b) if direction == "ab" else (b, a)
