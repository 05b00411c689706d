"""Named training recipes: each returns a RunConfig; `-quick` variants finish on 2 CPU cores.

A recipe names its dataset; `jobs/train.py` ingests it from the known source on first use (the
folder `$TRANSMUTE_DATASETS/<dataset>`, by default ../shared/datasets beside the repo) or says
which `prepare_data.py` command to run. Batch sizes are PER WORKER.

Quick variants keep the paper's losses, optimisers and norms and shrink only widths, image size
and steps, so that they show the whole pipeline (Ray Train, checkpoints, evaluation, MLflow,
registry) in a few minutes; their images are not meant to be good.

`-15min` variants are tuned by measurement to translate as well as they can in 15 minutes of a
2-core machine, wall time from the command to its end (`train.max_minutes = 15`: the run times
its first steps and picks its number of steps, see pipeline/budget.py). They keep each paper's
losses and optimisers and choose image size, widths, batch, learning rate and reader; each
function says what it changed and why. `benchmarks/quality.py --all` runs them.
"""

import dataclasses

from pipeline.run_config import (
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    RunConfig,
    TrainSettings,
    make_config,
)


def _facades(**data) -> DataSettings:
    return DataSettings(dataset="facades", load_size=286, crop_size=256, **data)


def cyclegan_facades() -> RunConfig:
    """CycleGAN photo ↔ label map, the paper's 256² setting: 200 epochs of 400 images, batch 1."""
    cfg = make_config("cyclegan", recipe="cyclegan_facades", data=_facades(),
                      train=TrainSettings(steps=80_000, batch_size=1),
                      eval=EvalSettings(every=4000, label_domain="b", num_classes=12),
                      checkpoint=CheckpointSettings(every=4000))
    return cfg


def dualgan_facades() -> RunConfig:
    """DualGAN photo ↔ label map as seed 000 and the paper: WGAN with clipping, n_critic 2 (each
    critic update on a fresh batch), RMSProp at a constant 5e-5 (the paper decays nothing), λ 500,
    batch norm; evaluated in both modes so the train/inference gap of batch norm is measured."""
    cfg = make_config("dualgan", recipe="dualgan_facades", data=_facades(),
                      train=TrainSettings(steps=40_000, batch_size=1),
                      eval=EvalSettings(every=4000, label_domain="b", num_classes=12, train_mode_too=True),
                      checkpoint=CheckpointSettings(every=4000))
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_from=1.0))  # constant rate


def bicyclegan_facades() -> RunConfig:
    """BicycleGAN label map → photo (the right half to the left), batch 2 split into its two cycles;
    as the reference's facades script: loaded at 256 without the 286 crop, dropout on."""
    cfg = make_config("bicyclegan", recipe="bicyclegan_facades",
                      data=DataSettings(dataset="facades", load_size=256, crop_size=256, swap_ab=True),
                      train=TrainSettings(steps=80_000, batch_size=2),
                      eval=EvalSettings(every=4000, label_domain=""),
                      checkpoint=CheckpointSettings(every=4000))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, use_dropout=True))


def pix2pix_facades() -> RunConfig:
    """pix2pix label map → photo (BicycleGAN's baseline)."""
    return make_config("pix2pix", recipe="pix2pix_facades", data=_facades(swap_ab=True),
                       train=TrainSettings(steps=80_000, batch_size=1),
                       eval=EvalSettings(every=4000, label_domain=""),
                       checkpoint=CheckpointSettings(every=4000))


def cogan_digits() -> RunConfig:
    """CoGAN on MNIST (a) and USPS (b), both resized to 28 px: pairs of the same digit from one z."""
    cfg = make_config("cogan", recipe="cogan_digits",
                      data=DataSettings(dataset="digits", load_size=28, flip=False),
                      train=TrainSettings(steps=20_000, batch_size=64),
                      eval=EvalSettings(every=2000, label_domain=""),
                      checkpoint=CheckpointSettings(every=2000))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_split="val"))


def cyclegan_mnist2mnistm() -> RunConfig:
    """CycleGAN MNIST (gray 28 px) ↔ MNIST-M (colour 32 px), both at 32 px; no identity loss since
    the channel counts differ. Scored by label preservation."""
    cfg = make_config("cyclegan", recipe="cyclegan_mnist2mnistm",
                      data=DataSettings(dataset="mnist2mnistm", load_size=32, flip=False),
                      train=TrainSettings(steps=20_000, batch_size=8),
                      eval=EvalSettings(every=2000, label_domain="", max_images=500),
                      checkpoint=CheckpointSettings(every=2000))
    model = dataclasses.replace(cfg.model, channels_a=1, channels_b=3, lambda_identity=0.0, n_blocks=6)
    return dataclasses.replace(cfg, model=model)


def quick(cfg: RunConfig, steps: int, size: int, batch_size: int, **model) -> RunConfig:
    """Small widths and images, few steps, one evaluation and checkpoint midway."""
    data = dataclasses.replace(cfg.data, load_size=size + size // 8 if cfg.data.crop_size else size,
                               crop_size=size if cfg.data.crop_size else 0)
    return dataclasses.replace(
        cfg, recipe=cfg.recipe + "-quick", data=data, model=dataclasses.replace(cfg.model, **model),
        train=dataclasses.replace(cfg.train, steps=steps, batch_size=batch_size, log_every=10),
        eval=dataclasses.replace(cfg.eval, every=steps // 2, max_images=min(cfg.eval.max_images, 48)),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=steps // 2),
    )


def budget(cfg: RunConfig, size: int, batch_size: int, eval_every: int, reader: str = "local",
           data=None, **model) -> RunConfig:
    """A `-15min` variant: 15 minutes of wall time, the given image size, batch and widths; the
    in-process reader (Ray Data costs more than the step on small images here: issue 15); one
    worker with both cores of the 2-core machine (Ray gives it OMP_NUM_THREADS=2)."""
    crop = cfg.data.crop_size and size
    settings = dict(load_size=size + size // 8 if crop else size, crop_size=crop or 0, reader=reader)
    return dataclasses.replace(
        cfg, recipe=cfg.recipe + "-15min",
        data=dataclasses.replace(cfg.data, **{**settings, **(data or {})}),
        model=dataclasses.replace(cfg.model, **model),
        train=dataclasses.replace(cfg.train, batch_size=batch_size, log_every=50, max_minutes=15.0),
        eval=dataclasses.replace(cfg.eval, every=eval_every),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=eval_every),
        scaling=dataclasses.replace(cfg.scaling, cpus_per_worker=2.0),
    )


RECIPES = {
    "cyclegan_facades": cyclegan_facades,
    "dualgan_facades": dualgan_facades,
    "bicyclegan_facades": bicyclegan_facades,
    "pix2pix_facades": pix2pix_facades,
    "cogan_digits": cogan_digits,
    "cyclegan_mnist2mnistm": cyclegan_mnist2mnistm,
    "cyclegan_facades-quick": lambda: quick(cyclegan_facades(), 120, 32, 2, ngf=8, ndf=8, n_blocks=2),
    "dualgan_facades-quick": lambda: quick(dualgan_facades(), 120, 32, 2, ngf=8, ndf=8, num_downs=5),
    "bicyclegan_facades-quick": lambda: quick(bicyclegan_facades(), 120, 32, 2, ngf=8, ndf=8, nef=8,
                                              num_downs=5, e_blocks=3, n_layers_d=2),
    "pix2pix_facades-quick": lambda: quick(pix2pix_facades(), 120, 32, 2, ngf=8, ndf=8, num_downs=5),
    "cogan_digits-quick": lambda: quick(cogan_digits(), 200, 28, 32, ngf=16, ndf=16, nz=32),
    "cyclegan_mnist2mnistm-quick": lambda: quick(cyclegan_mnist2mnistm(), 150, 32, 8,
                                                 ngf=8, ndf=8, n_blocks=2),
    "cyclegan_mnist2mnistm-15min": lambda: budget(cyclegan_mnist2mnistm(), 32, 4, 1000,
                                                  ngf=32, ndf=32, n_blocks=3),
    "cogan_digits-15min": lambda: budget(cogan_digits(), 28, 64, 1000),
    "cyclegan_facades-15min": lambda: budget(cyclegan_facades(), 64, 1, 1000, ngf=32, ndf=32, n_blocks=6),
    "dualgan_facades-15min": lambda: budget(dualgan_facades(), 64, 1, 1000, ngf=32, ndf=32, num_downs=6),
    "pix2pix_facades-15min": lambda: budget(pix2pix_facades(), 64, 1, 1000, ngf=32, ndf=32, num_downs=6),
    "bicyclegan_facades-15min": lambda: budget(bicyclegan_facades(), 64, 2, 1000, data={"load_size": 64},
                                               ngf=32, ndf=32, nef=32, num_downs=6, e_blocks=3, n_layers_d=2),
}


def recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
