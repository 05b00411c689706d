import json
import os
from dataclasses import dataclass, field

import pytest

from models.dualgan import Config as DualConfig
from pipeline import run_config
from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, to_dict
from pipeline.run_config import flat_params, from_json, make_config, model_config, override, to_json

OLD = os.path.join(os.path.dirname(__file__), "assets", "old_config")  # written by today's code (README)


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
    cfg = apply_overrides(Run(), ["model.norm=batch_renorm", "model.lambda_a=1e-4", "scaling.num_workers=2",
                                  "scaling.use_gpu=true", "model.betas=0.9,0.99", "data=/tmp/x"])
    assert cfg.model.norm == "batch_renorm" and cfg.model.lambda_a == 1e-4
    assert cfg.scaling == Scaling(2, True) and cfg.model.betas == (0.9, 0.99) and cfg.data == "/tmp/x"
    assert Run().model.lambda_a == 500.0  # the default object is untouched


def test_unknown_keys_and_bad_values_say_what_is_valid():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nrom'.*model.norm"):
        apply_overrides(Run(), ["model.nrom=instance"])
    with pytest.raises(ConfigError, match="scaling.num_workers: expected int, got 'two'"):
        apply_overrides(Run(), ["scaling.num_workers=two"])
    with pytest.raises(ConfigError, match="expected true or false"):
        apply_overrides(Run(), ["scaling.use_gpu=maybe"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Run(), ["model.norm"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(Run(), ["scaling=1"])


def test_round_trip_and_flat_names():
    cfg = apply_overrides(Run(), {"model.lambda_a": 100.0, "scaling.num_workers": 3})
    assert from_dict(Run, to_dict(cfg)) == cfg
    assert from_dict(Run, json.loads(to_json(cfg))) == cfg
    flat = flatten(cfg)
    assert flat["model.lambda_a"] == 100.0 and flat["scaling.num_workers"] == 3 and "model" not in flat


def test_optim_lr_is_the_one_rate_with_the_papers_default():
    assert make_config("dualgan").optim.lr == 5e-5 and make_config("cyclegan").optim.lr == 2e-4
    cfg = override(make_config("dualgan"), ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and not hasattr(cfg.model, "lr")
    assert override(cfg, ["optim.lr=none"]).optim.lr == 5e-5  # none: back to the paper's
    assert flat_params(cfg)["optim.lr"] == 1e-4 and "model.lr" not in flat_params(cfg)
    assert from_json(to_json(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"optim.lr=-0.0001 is not allowed: a finite number >= 0"):
        override(cfg, ["optim.lr=-1e-4"])


def _old(name):
    with open(os.path.join(OLD, name)) as f:
        return f.read()


def test_old_files_load(monkeypatch, capsys):
    """Checkpoints' config.json, best_config.json and MLflow params written before model.lr and
    data.s3_endpoint moved: the rate that was used and the endpoint land in their new keys."""
    monkeypatch.setattr(run_config, "_noted", set())
    checkpoint = from_json(_old("config.json"))  # model.lr=1e-4 beside optim.lr None
    assert checkpoint.model_name == "dualgan" and checkpoint.optim.lr == 1e-4 and checkpoint.model.ngf == 8
    best = from_json(_old("best_config.json"))  # optim.lr=3e-4 won over model.lr 2e-4
    assert best.optim.lr == 3e-4 and best.storage.endpoint == "http://127.0.0.1:8333"
    params = json.loads(_old("params.json"))  # strings, as MLflow keeps them
    run = override(make_config(params["model_name"]), params)
    assert run.optim.lr == 1e-4 and run.storage.endpoint == "http://10.0.0.1:9000"
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: config key model.lr is now optim.lr; reading it as optim.lr",
                     "note: config key data.s3_endpoint is now storage.endpoint; "
                     "reading it as storage.endpoint",
                     "note: config key eval.samples is now eval.grid_rows; "
                     "reading it as eval.grid_rows"]  # once each, though read three times


def test_old_keys_in_overrides_are_mapped():
    cfg = override(make_config("cyclegan"), ["data.s3_endpoint=http://x:1", "model.lr=1e-3"])
    assert cfg.storage.endpoint == "http://x:1" and cfg.optim.lr == 1e-3
    both = override(make_config("cyclegan"), ["data.s3_endpoint=http://old:1", "storage.endpoint=http://new:2"])
    assert both.storage.endpoint == "http://new:2"  # the new key wins
    assert override(make_config("cyclegan"), ["eval.samples=2"]).eval.grid_rows == 2  # one meaning of samples


def test_old_generator_config_loads():
    info = json.loads(_old("generator.json"))  # a logged generator's model config, with its lr
    cfg = model_config(info["model"], info["config"])
    assert cfg.ngf == 4 and cfg.n_blocks == 1 and not hasattr(cfg, "lr")
