"""Tiny RunConfigs for loop, checkpoint and job tests (small widths, 32 px, a few steps)."""

import dataclasses
import os

from tiny import TINY

from pipeline.run_config import (
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    StorageSettings,
    TrackingSettings,
    TrainSettings,
    make_config,
    resolve_paths,
)


def tiny_run(tmp_path, data_path, model="cyclegan", name="run", steps=8, every=4, batch_size=2,
             reader="local", **model_overrides):
    cfg = make_config(
        model, recipe=f"test-{model}",
        data=DataSettings(path=data_path, load_size=36, crop_size=32, reader=reader),
        train=TrainSettings(steps=steps, batch_size=batch_size, log_every=2),
        eval=EvalSettings(every=0, max_images=8, grid_rows=2, label_domain=""),
        checkpoint=CheckpointSettings(every=every, keep=10),
        storage=StorageSettings(path=str(tmp_path / "runs")),
        tracking=TrackingSettings(run_name=name),
        home=str(tmp_path / "home"),
    )
    model_cfg = dataclasses.replace(cfg.model, **{**TINY[model], **model_overrides})
    return resolve_paths(dataclasses.replace(cfg, model=model_cfg))


def checkpoint_dir(cfg, step):
    return os.path.join(cfg.storage.path, cfg.tracking.run_name, f"checkpoint_{step:08d}")
