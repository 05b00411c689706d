"""What a run trains and checkpoints (`Trainee`: nets, optimizers, schedules, per-model state, the
progress) and how it is built, restored, rescheduled and saved.

Determinism: every rank seeds the same run seed before building the nets (equal initial weights),
then its own rank seed for dropout, pools and z; a checkpoint restores each rank's RNG streams, so a
resumed run ends with the same weights as an uninterrupted one.
"""

import dataclasses

import torch

from models.norms import PAPER_WARMUP, renorm_limits, set_renorm_limits


@dataclasses.dataclass
class Progress:
    """Where training stands: generator updates done, and the data position (epoch, batches of
    this epoch consumed on each rank). Resuming at (epoch, batch) replays nothing and skips nothing."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    steps: int = 0  # the run's total steps once a time budget fixed them (0: train.steps decides)


def lr_factor(step: int, steps: int, decay_from: float) -> float:
    """Constant, then linear decay to 0 at the last step (CycleGAN's schedule, counted in steps)."""
    start = int(decay_from * steps)
    if step < start or steps <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (steps - start))


def make_schedulers(cfg, optimizers: dict) -> dict:
    return {name: torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg)) for name, opt in optimizers.items()}


def schedule(cfg):
    steps, decay_from = cfg.train.steps, cfg.optim.decay_from
    return lambda s: lr_factor(s, steps, decay_from)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank randomness (dropout, pools, z) from one run seed; weights start equal on all ranks."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**31


def check_channels(cfg, model_cfg) -> None:
    from pipeline.data import read_manifest

    domains = read_manifest(cfg.data.path, cfg.storage.endpoint or None)["domains"]
    stored = {}
    for name, info in domains.items():
        for key in (["a", "b"] if name == "ab" else [name]):
            stored[key] = info["channels"]
    if cfg.data.swap_ab:
        stored = {"a": stored.get("b"), "b": stored.get("a")}
    for key in ("a", "b"):
        want = getattr(model_cfg, f"channels_{key}", None)
        if want is not None and key in stored and stored[key] != want:
            raise ValueError(f"{cfg.data.path}: domain {key} is stored with {stored[key]} channels but "
                             f"model.channels_{key}={want}; set --set model.channels_{key}={stored[key]}")


@dataclasses.dataclass
class Trainee:
    """Everything a run updates and checkpoints."""

    nets: torch.nn.ModuleDict
    optimizers: dict
    schedulers: dict
    state: dict
    progress: Progress
    resumed_from: int | None = None  # step of the checkpoint this process started from
    setup_s: float = 0.0  # seconds rank 0 took to build its evaluator (a budget reserves as much)
    last_eval: dict = dataclasses.field(default_factory=dict)  # the latest validation metrics


def build_trainee(cfg, spec, model_cfg, session) -> Trainee:
    from pipeline import checkpoint as ckpt
    from pipeline.distributed import broadcast_module

    ckpt.seed_everything(cfg.train.seed)  # equal initial weights on every rank
    nets = spec.build_nets(model_cfg).to(session.device)
    if cfg.scaling.channels_last and session.device.type == "cuda":
        nets = nets.to(memory_format=torch.channels_last)
    if session.world > 1:
        broadcast_module(nets)
    optimizers = spec.make_optimizers(model_cfg, nets, cfg.optim.lr)
    trainee = Trainee(nets, optimizers, make_schedulers(cfg, optimizers), {}, Progress())
    restored = session.restore(lambda d: ckpt.load(d, rank=session.rank, nets=nets, optimizers=optimizers,
                                                   schedulers=trainee.schedulers, device=session.device))
    if restored is None or not restored["rank_restored"]:
        ckpt.seed_everything(rank_seed(cfg.train.seed, session.rank))
    if restored is not None:
        trainee.state = restored["state"]
        trainee.progress = Progress(**restored["progress"])
        trainee.resumed_from = trainee.progress.step
        apply_learning_rate(cfg, trainee)
    return trainee


def apply_learning_rate(cfg, trainee: Trainee) -> None:
    """After a restore, this run's learning rate wins over the checkpoint's: a PBT exploit loads
    the donor's optimizers and schedulers, then continues with the mutated rate (a --resume with
    optim.lr changed likewise). Loss weights, Batch Renorm limits and the rest are read from the
    config at every step, so they need nothing here."""
    factor = lr_factor(trainee.progress.step, cfg.train.steps, cfg.optim.decay_from)
    for name, scheduler in trainee.schedulers.items():
        scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
        for group in trainee.optimizers[name].param_groups:
            group["initial_lr"], group["lr"] = cfg.optim.lr, cfg.optim.lr * factor


def save_checkpoint(cfg, session, trainee: Trainee, tracker) -> str:
    from pipeline import checkpoint as ckpt
    from pipeline.distributed import barrier
    from pipeline.run_config import public_config, to_json

    step = trainee.progress.step
    directory = session.checkpoint_dir(step)
    parts = ckpt.Parts(trainee.nets, trainee.optimizers, trainee.schedulers, trainee.state,
                       dataclasses.asdict(trainee.progress))
    ckpt.save(directory, parts, rank=session.rank, config_json=to_json(public_config(cfg)))
    barrier()
    if session.rank == 0:
        ckpt.write_meta(directory, {**dataclasses.asdict(trainee.progress), "run_id": cfg.tracking.run_id,
                                    "world_size": session.world, "model": cfg.model_name})
        tracker.set_tags({"checkpoint.latest": session.checkpoint_location(step)})
    return directory


def compiled(cfg, nets):
    if not cfg.scaling.compile:
        return nets
    return torch.nn.ModuleDict({k: torch.compile(v) for k, v in nets.items()})


def renorm_at(renorm, step: int, steps: int) -> tuple[float, float]:
    """Batch Renorm's (rmax, dmax) after `step` of `steps` updates, from a RenormSettings: its
    fractions of the run, or with warmup_steps > 0 the paper's points scaled to end there."""
    if renorm.warmup_steps > 0:
        scale = renorm.warmup_steps / PAPER_WARMUP["rmax_until"]
        points = [PAPER_WARMUP[k] * scale for k in ("bn_until", "rmax_until", "dmax_until")]
    else:
        points = [renorm.bn_until * steps, renorm.rmax_until * steps, renorm.dmax_until * steps]
    return renorm_limits(step, *points, renorm.rmax, renorm.dmax)


def set_renorm(cfg, nets, step: int) -> None:
    set_renorm_limits(nets, *renorm_at(cfg.renorm, step, cfg.train.steps))


UNDECIDED = 2**62  # train.steps of a budget run before the budget fixes them


def with_steps(cfg, steps: int):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def fix_steps(cfg, trainee: Trainee, steps: int):
    """The run's config with `steps` total, kept in the progress (and so in checkpoints)."""
    trainee.progress = dataclasses.replace(trainee.progress, steps=steps)
    return reschedule(with_steps(cfg, steps), trainee)


def reschedule(cfg, trainee: Trainee):
    """The LR schedule re-read from cfg.train.steps (the budget fixes them before any decay)."""
    for scheduler in trainee.schedulers.values():
        scheduler.lr_lambdas = [schedule(cfg)] * len(scheduler.lr_lambdas)
    apply_learning_rate(cfg, trainee)
    return cfg
