from dataclasses import dataclass, field

import pytest

from models.dualgan import Config as DualConfig
from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, to_dict, to_json


@dataclass
class Scaling:
    num_workers: int = 1
    use_gpu: bool = False


@dataclass
class Run:
    model: DualConfig = field(default_factory=DualConfig)
    scaling: Scaling = field(default_factory=Scaling)
    data: str | None = None


def test_dotted_overrides_are_typed():
    cfg = apply_overrides(Run(), ["model.norm=batch_renorm", "model.lr=1e-4", "scaling.num_workers=2",
                                  "scaling.use_gpu=true", "model.betas=0.9,0.99", "data=/tmp/x"])
    assert cfg.model.norm == "batch_renorm" and cfg.model.lr == 1e-4
    assert cfg.scaling == Scaling(2, True) and cfg.model.betas == (0.9, 0.99) and cfg.data == "/tmp/x"
    assert Run().model.lr == 5e-5  # the default object is untouched


def test_unknown_keys_and_bad_values_say_what_is_valid():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nrom'.*model.norm"):
        apply_overrides(Run(), ["model.nrom=instance"])
    with pytest.raises(ConfigError, match="scaling.num_workers: expected int, got 'two'"):
        apply_overrides(Run(), ["scaling.num_workers=two"])
    with pytest.raises(ConfigError, match="expected true or false"):
        apply_overrides(Run(), ["scaling.use_gpu=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Run(), ["model.lr"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(Run(), ["scaling=1"])


def test_round_trip_and_flat_names():
    cfg = apply_overrides(Run(), {"model.lambda_a": 100.0, "scaling.num_workers": 3})
    assert from_dict(Run, to_dict(cfg)) == cfg
    import json
    assert from_dict(Run, json.loads(to_json(cfg))) == cfg
    flat = flatten(cfg)
    assert flat["model.lambda_a"] == 100.0 and flat["scaling.num_workers"] == 3 and "model" not in flat
