"""One trained generator as a self-describing artifact: `generator.json` (what it is) beside
`generator.safetensors` (its weights), in the spirit of diffusers' config.json + weights.

generator.json:
  {"model": "cyclegan", "config": {...the model's Config...}, "direction": "ab", "net": "G_ab",
   "image_size": 256, "swap_ab": false, "aligned": true, "channels": {"input": 3, "output": 3}}
`image_size` is the training image size (crop, else load size; null when unknown), `swap_ab`
whether domain a was the right half of aligned pairs (`data.swap_ab`), so the half of an aligned
row it reads is `reads_half`; `aligned` whether the training images were such a|b pairs (batch
translation then reads that half of a folder's pair images; null: not recorded). `channels` is
derived from the config and written for readers only.
Files written before `image_size` and `swap_ab` were recorded load with both None: the caller then
asks the MLflow run that logged them (pipeline.translate.model).

This one module writes and reads it for checkpoints, MLflow logging, the served pyfunc model and
batch translation. It imports only torch, safetensors and `models`, because MLflow ships it as code
beside `served_generator.py` (see pipeline.registry), and loading never unpickles: JSON and tensors.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import MODELS

CONFIG_FILE = "generator.json"
WEIGHTS_FILE = "generator.safetensors"
DROPPED_KEYS = ("lr",)  # held by model configs before the rate moved to optim.lr; serving needs none


@dataclass
class GeneratorArtifact:
    model_name: str
    config: Any  # the model's Config dataclass
    direction: str
    net_name: str
    weights: dict  # state dict, contiguous CPU tensors
    size: int | None = None  # the training image size; None: not recorded
    swap_ab: bool | None = None  # trained with aligned pairs' right half as domain a; None: not recorded
    aligned: bool | None = None  # trained on aligned a|b pair images; None: not recorded

    @classmethod
    def from_net(cls, model_name: str, config, direction: str, net: torch.nn.Module,
                 size: int | None, swap_ab: bool, aligned: bool | None = None) -> "GeneratorArtifact":
        """The generator serving `direction` among a model's nets (`net` is that generator)."""
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
        return cls(model_name, config, direction, MODELS[model_name].generator_for[direction], weights,
                   size, swap_ab, aligned)

    @property
    def spec(self):
        return MODELS[self.model_name]

    @property
    def channels(self) -> tuple[int | None, int]:
        """(input channels, output channels); a generator of pairs (CoGAN) takes no image and writes
        a|b side by side (RGB unless both domains have the same channels)."""
        a, b = self.config.channels_a, self.config.channels_b
        if not self.spec.takes_input:
            return None, a if a == b else 3
        return (a, b) if self.direction == "ab" else (b, a)

    def reads_half(self) -> str:
        """The half of an aligned a|b row the generator takes as input: ab reads the left half and
        ba the right one, swapped for a model trained with data.swap_ab."""
        return "left" if (self.direction == "ab") != bool(self.swap_ab) else "right"

    def build(self, device="cpu") -> torch.nn.Module:
        """The generator net with these weights, in eval mode on `device`."""
        net = self.spec.build_nets(self.config)[self.net_name]
        net.load_state_dict(self.weights)
        return net.to(device).eval()

    def to_json(self) -> dict:
        channels_in, channels_out = self.channels
        return {"model": self.model_name, "config": dataclasses.asdict(self.config),
                "direction": self.direction, "net": self.net_name, "image_size": self.size,
                "swap_ab": self.swap_ab, "aligned": self.aligned,
                "channels": {"input": channels_in, "output": channels_out}}

    def export(self, folder: str) -> str:
        """Write generator.json and generator.safetensors into `folder`; returns it."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
        save_file(self.weights, os.path.join(folder, WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: str) -> "GeneratorArtifact":
        """Read what `export` wrote: the two files in `folder`, or under `folder`/artifacts (an MLflow
        pyfunc model directory)."""
        if os.path.exists(os.path.join(folder, "artifacts", CONFIG_FILE)):
            folder = os.path.join(folder, "artifacts")
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {folder} or {folder}/artifacts: "
                                    "not a logged generator")
        try:
            with open(path) as f:
                spec = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        weights = load_file(os.path.join(folder, WEIGHTS_FILE))  # safetensors: tensors only, never pickles
        return cls(spec["model"], model_config(spec["model"], spec["config"]), spec["direction"], spec["net"],
                   weights, spec.get("image_size"), spec.get("swap_ab"), spec.get("aligned"))


def model_config(model_name: str, data: dict):
    """The model's Config from its JSON dict: lists back to tuples, keys it no longer has refused
    (but `lr`, see DROPPED_KEYS)."""
    config_class = MODELS[model_name].Config
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known - set(DROPPED_KEYS))
    if unknown:
        raise ValueError(f"{model_name} config has no {', '.join(unknown)}: written by another version?")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
