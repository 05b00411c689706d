"""Training loops: `train_local` (plain torch, one process) and `run_training`, the full loop that
Ray Train's workers run (and that a plain torch.distributed launch can run without Ray).

The loop owns modes, devices, autocast, data order, schedules, gradient averaging, evaluation,
checkpoints and tracking; the models' free `train_step` does one update and nothing else.
"""

import contextlib
import dataclasses
import math
import os
import threading
import time

import torch

from models.norms import PAPER_WARMUP, renorm_limits, set_renorm_limits


def cycle(batches):
    """Repeat an epoch-iterable forever, telling it the epoch when it can reshuffle."""
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def train_local(spec, cfg, batches, steps, *, nets=None, optimizers=None, state=None, seed=0,
                renorm=None, every=0, on_every=None, device="cpu"):
    """Run `steps` generator updates over `batches`; return (nets, optimizers, state, history).

    Each step draws `spec.batches_per_step(cfg)` fresh batches. `on_every(step, nets, losses)` is
    called every `every` steps and after the last one. `renorm` (a RenormSettings; None = the
    defaults, the paper's warm-up over `steps`) sets Batch Renorm's limits at every step.
    """
    from pipeline.run_config import RenormSettings

    torch.manual_seed(seed)
    nets = spec.build_nets(cfg).to(device) if nets is None else nets
    optimizers = spec.make_optimizers(cfg, nets) if optimizers is None else optimizers
    state = {} if state is None else state
    renorm = RenormSettings() if renorm is None else renorm
    per_step = spec.batches_per_step(cfg)
    nets.train()
    history = []
    stream = cycle(batches)
    for step in range(1, steps + 1):
        set_renorm_limits(nets, *renorm_at(renorm, step - 1, steps))
        start = time.perf_counter()
        drawn = [{k: v.to(device) for k, v in next(stream).items() if k in ("a", "b")}
                 for _ in range(per_step)]
        losses = spec.train_step(cfg, nets, optimizers, drawn[0] if per_step == 1 else drawn, state)
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {step}: non-finite losses {bad}; lower the learning rate")
        n = sum(b["a"].shape[0] for b in drawn)  # every image the step consumed
        losses["perf/images_per_s"] = n / max(time.perf_counter() - start, 1e-9)
        history.append(losses)
        if on_every and every and (step % every == 0 or step == steps):
            on_every(step, nets, losses)
    return nets, optimizers, state, history


# ============================================================================= the full training loop


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


def batches_per_epoch(cfg, world: int) -> int:
    from pipeline.data import read_manifest, split_counts

    counts = split_counts(read_manifest(cfg.data.path, cfg.storage.endpoint or None), cfg.data.train_split)
    n = max(counts.values()) // world // cfg.train.batch_size
    if n < 1:
        raise ValueError(f"{cfg.data.path}: {max(counts.values())} training samples cannot fill one batch of "
                         f"{cfg.train.batch_size} on each of {world} workers; lower train.batch_size")
    return n


def epoch_batches(cfg, world: int, rank: int, epoch: int, skip_batches: int):
    """This rank's batches of one epoch, starting after `skip_batches` (resume)."""
    from pipeline.data import ReadSpec

    spec = ReadSpec.from_config(cfg)
    where = dict(epoch=epoch, world_size=world, rank=rank, skip=skip_batches * spec.batch_size)
    if cfg.data.reader == "ray":
        from pipeline.data import ray_batches

        return ray_batches(spec, **where)
    from pipeline.data import LocalReader

    return iter(LocalReader(spec, **where))


def batch_stream(cfg, world: int, rank: int, progress: Progress, per_step: int = 1):
    """(epoch, index in epoch, batch) forever, from the saved data position on; a step takes
    `per_step` batches. With the Ray Data reader the next epoch starts reading halfway through this
    one: a fresh Ray Data execution takes seconds to yield its first batch, which would otherwise
    stall every epoch boundary."""
    per_epoch = batches_per_epoch(cfg, world)
    epoch, skip = progress.epoch, progress.batch
    consumed, needed = progress.step * per_step, cfg.train.steps * per_step  # batches
    if skip >= per_epoch:
        epoch, skip = epoch + 1, 0
    current = epoch_batches(cfg, world, rank, epoch, skip)
    while True:
        upcoming = None
        for index, batch in enumerate(current, start=skip):
            needs_next = consumed + per_epoch - index < needed  # batches left after this epoch
            if upcoming is None and cfg.data.reader == "ray" and index >= per_epoch // 2 and needs_next:
                upcoming = Prefetched(epoch_batches, cfg, world, rank, epoch + 1, 0)
            consumed += 1
            yield epoch, index, batch
        current = upcoming or epoch_batches(cfg, world, rank, epoch + 1, 0)
        epoch, skip = epoch + 1, 0


class Prefetched:
    """An iterator made, and its first item fetched, in a background thread: iterating waits only
    for whatever of that is not done yet. The batches are the same as without it."""

    _END = object()

    def __init__(self, make, *args):
        self._made: dict = {}
        self._thread = threading.Thread(target=self._start, args=(make, args), daemon=True)
        self._thread.start()

    def _start(self, make, args) -> None:
        try:
            iterator = iter(make(*args))
            self._made["first"], self._made["rest"] = next(iterator, self._END), iterator
        except BaseException as error:  # raised again in the consumer's thread
            self._made["error"] = error

    def __iter__(self):
        self._thread.join()
        if "error" in self._made:
            raise self._made["error"]
        if self._made["first"] is not self._END:
            yield self._made["first"]
        yield from self._made["rest"]


def prepare_batch(cfg, batch: dict, device, channels_last: bool) -> dict:
    keys = {"a": "b", "b": "a", "label_a": "label_b", "label_b": "label_a"} if cfg.data.swap_ab else {}
    out = {}
    for key, value in batch.items():
        if key in ("a", "b", "label_a", "label_b"):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            out[keys.get(key, key)] = value
    return out


class Meter:
    """Step losses and timings averaged over the logging window. A loss is averaged over the steps
    that reported it (CoGAN updates D every other step). `images` is every image a step consumed:
    all n_critic batches of a DualGAN step, on all workers."""

    def __init__(self):
        self.sums, self.counts, self.count, self.images, self.wait, self.busy = {}, {}, 0, 0, 0.0, 0.0

    def add(self, losses: dict, images: int, wait: float, total: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1
        self.images += images
        self.wait += wait
        self.busy += total

    def flush(self) -> dict:
        if not self.count:
            return {}
        out = {k: v / self.counts[k] for k, v in self.sums.items()}
        out["perf/images_per_s"] = self.images / max(self.busy, 1e-9)
        out["perf/step_time_s"] = self.busy / self.count
        out["perf/data_wait_fraction"] = self.wait / max(self.busy, 1e-9)
        self.__init__()
        return out


def check_finite(losses: dict, step: int) -> None:
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite losses {bad}; lower the learning rate (optim.lr)")


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


@contextlib.contextmanager
def autocast(cfg, device):
    if device.type == "cuda" and cfg.scaling.bf16:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def kept_buffers(nets):
    """Evaluating in train mode updates batch-norm running statistics: put them back after."""
    saved = [(b, b.detach().clone()) for b in nets.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def rng_fork(device):
    """Evaluation draws random z and noise; a fork keeps the training RNG stream untouched, so a
    resumed run (which evaluates at other moments) ends with the same weights."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ----------------------------------------------------------------------------- where the loop runs


def checkpoint_uri(cfg, step: int) -> str:
    from pipeline import storage

    return storage.join(cfg.storage.path, cfg.tracking.run_name, f"checkpoint_{step:08d}")


class PlainSession:
    """No Ray: one process, or a `torchrun` launch (torch.distributed env). Checkpoints go to
    <storage>/<run name>/checkpoint_<step> on local disk, the same layout Ray Train writes."""

    def __init__(self, cfg, device=None):
        import torch.distributed as dist

        from pipeline.distributed import is_distributed

        self.cfg = cfg
        self.rank = dist.get_rank() if is_distributed() else 0
        self.world = dist.get_world_size() if is_distributed() else 1
        self.device = torch.device(device or ("cuda" if cfg.scaling.use_gpu else "cpu"))
        if "://" in cfg.storage.path:
            raise ValueError("the plain (no Ray) loop checkpoints to local disk only; "
                             "use Ray for s3:// storage")
        self.root = os.path.join(cfg.storage.path, cfg.tracking.run_name)

    def restore(self, load):
        from pipeline.checkpoint import latest_local

        directory = latest_local(self.root)
        return load(directory) if directory else None

    def checkpoint_dir(self, step: int) -> str:
        from pipeline.checkpoint import local_checkpoint_dir

        return local_checkpoint_dir(self.root, step)

    def checkpoint_location(self, step: int) -> str:
        return checkpoint_uri(self.cfg, step)

    def report(self, metrics: dict, directory: str | None, step: int) -> None:
        from pipeline.checkpoint import prune_local

        if directory and self.rank == 0:
            prune_local(self.root, self.cfg.checkpoint.keep)


def load_reported(checkpoint, load):
    """Run `load(directory)` on a checkpoint that Ray Train or Tune hands back (None: nothing to load)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load(directory)


class RaySession:
    """Inside a Ray Train worker: ranks from the train context, checkpoints through ray.train.report
    (Ray merges every rank's files into one checkpoint directory in the run's storage)."""

    def __init__(self, cfg):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self, load):
        import ray.train

        return load_reported(ray.train.get_checkpoint(), load)

    def checkpoint_dir(self, step: int) -> str:
        from pipeline.checkpoint import staging_dir

        return staging_dir()

    def checkpoint_location(self, step: int) -> str:
        return checkpoint_uri(self.cfg, step)

    def report(self, metrics: dict, directory: str | None, step: int) -> None:
        import shutil

        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        name = f"checkpoint_{step:08d}" if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------- tracking and evaluation glue


class NoTracker:
    """Ranks other than 0, and runs started without MLflow, log nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def open_tracker(cfg, rank: int):
    if rank != 0 or not cfg.tracking.run_id:
        return NoTracker()
    from pipeline.tracking import Tracker

    return Tracker(cfg.tracking.uri, cfg.tracking.run_id)


def image_size(cfg) -> int | None:
    return cfg.data.crop_size or cfg.data.load_size or None


def build_evaluator(cfg, spec, model_cfg, device, split: str):
    from pipeline.evaluation import Evaluator

    return Evaluator.from_config(cfg, split, device, spec, model_cfg)


def evaluate(cfg, evaluator, nets, device, prefix: str) -> dict:
    """Metrics in the mode a user is served (`evaluator.mode`: per_image for a batch-norm generator,
    eval otherwise), renamed from eval/ to `prefix`/. A batch-norm generator also gets
    `<prefix>_running_stats/` (eval mode: running statistics) and `<prefix>_running_stats_gap/`
    (|per-image − running statistics|, seed 000). With eval.train_mode_too, `<prefix>_train_mode/`
    (every layer in training mode over the eval batches) and `<prefix>_gap/`, its distance from
    the eval-mode (running statistics) numbers."""
    stem = prefix.rstrip("/")
    with rng_fork(device):
        metrics = evaluator.metrics(nets)
        out = {prefix + k.removeprefix("eval/"): v for k, v in metrics.items()}
        running = metrics
        if evaluator.mode != "eval":
            running = evaluator.metrics(nets, mode="eval")
            out.update(with_gaps(running, metrics, f"{stem}_running_stats", f"{stem}_running_stats_gap"))
        if cfg.eval.train_mode_too:
            with kept_buffers(nets):
                train = evaluator.metrics(nets, mode="train")
            out.update(with_gaps(train, running, f"{stem}_train_mode", f"{stem}_gap"))
    return out


def with_gaps(metrics: dict, reference: dict, name: str, gap: str) -> dict:
    """eval/x of `metrics` as `name`/x, and |reference − metrics| as `gap`/x where both have x."""
    out = {}
    for k, v in metrics.items():
        out[f"{name}/{k.removeprefix('eval/')}"] = v
        if k in reference:
            out[f"{gap}/{k.removeprefix('eval/')}"] = abs(reference[k] - v)
    return out


def log_grids(cfg, evaluator, nets, device, tracker, step: int, tag: str = "samples") -> None:
    with rng_fork(device):
        grids = evaluator.grids(nets, n=cfg.eval.samples)
    for direction, grid in grids.items():
        tracker.log_image(grid, f"{tag}/step{step:07d}_{direction}.png")


def input_example(cfg, spec, model_cfg, direction: str):
    import numpy as np

    if not spec.takes_input:  # a generator from z is served z
        return np.zeros((1, spec.latent_size(model_cfg)), np.float32)
    channels = getattr(model_cfg, "channels_a" if direction == "ab" else "channels_b")
    size = image_size(cfg) or 256
    return np.zeros((1, channels, size, size), np.float32)


def register_generators(cfg, spec, model_cfg, nets, tracker, metrics: dict) -> None:
    from pipeline.checkpoint import net_tensors
    from pipeline.config import to_dict

    if not cfg.tracking.log_models:
        return
    base = cfg.tracking.registered_name or cfg.recipe or cfg.model_name
    for direction in spec.directions:
        net_name = spec.generator_for[direction]
        tracker.log_generator(
            cfg.model_name, to_dict(model_cfg), direction, net_name, net_tensors(nets[net_name]),
            input_example(cfg, spec, model_cfg, direction),
            registered_name=f"{base}-{direction}" if cfg.tracking.register else None, metrics=metrics,
        )


# ----------------------------------------------------------------------------- run_training


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
    from pipeline.run_config import to_json

    step = trainee.progress.step
    directory = session.checkpoint_dir(step)
    ckpt.save(directory, rank=session.rank, nets=trainee.nets, optimizers=trainee.optimizers,
              schedulers=trainee.schedulers, state=trainee.state,
              progress=dataclasses.asdict(trainee.progress), config_json=to_json(cfg))
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


def run_training(cfg, session) -> dict:
    """The loop every worker runs: resume, train, log, evaluate, checkpoint; returns rank 0's final
    metrics. `session` says where it runs (RaySession or PlainSession)."""
    from models import MODELS
    from pipeline.distributed import average_buffers, wrap_optimizers

    spec, model_cfg = MODELS[cfg.model_name], cfg.model
    check_channels(cfg, model_cfg)
    trainee = build_trainee(cfg, spec, model_cfg, session)
    if trainee.progress.steps:  # a budget run restored after its steps were fixed: keep them
        cfg = fix_steps(cfg, trainee, trainee.progress.steps)
    elif cfg.train.max_minutes:  # until the budget decides: no end, no LR decay, Batch Renorm as BN
        cfg = reschedule(with_steps(cfg, UNDECIDED), trainee)
    tracker = open_tracker(cfg, session.rank)
    if trainee.resumed_from is not None:  # a worker restart or --resume: same MLflow run, noted
        tracker.log_metrics({"progress/resumed_from_step": trainee.resumed_from}, trainee.resumed_from)
    evaluator = None
    if session.rank == 0:
        built = time.perf_counter()
        evaluator = build_evaluator(cfg, spec, model_cfg, session.device, cfg.data.val_split)
        trainee.setup_s = time.perf_counter() - built  # the test split's evaluator costs as much at the end
    if evaluator is not None and trainee.progress.step == 0:
        tracker.log_metrics(evaluator.baselines(), 0)
        if evaluator.notes:
            tracker.log_text("\n".join(evaluator.notes), "evaluation_notes.txt")
    budget = start_budget(cfg, spec, session, trainee, evaluator, tracker)
    run_nets, optimizers = compiled(cfg, trainee.nets), wrap_optimizers(trainee.optimizers, session.world)
    per_step = spec.batches_per_step(model_cfg)  # fresh batches per generator update
    stream, meter = batch_stream(cfg, session.world, session.rank, trainee.progress, per_step), Meter()
    channels_last = cfg.scaling.channels_last and session.device.type == "cuda"
    if session.device.type == "cuda":  # every batch has the crop's shape: autotuned kernels pay off
        torch.backends.cudnn.benchmark = True
    trainee.nets.train()
    while trainee.progress.step < cfg.train.steps:
        start = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step)]
        epoch, index = drawn[-1][0], drawn[-1][1]  # the data position after this step's last batch
        batches = [prepare_batch(cfg, batch, session.device, channels_last) for _, _, batch in drawn]
        waited = time.perf_counter() - start
        set_renorm(cfg, trainee.nets, trainee.progress.step)
        with autocast(cfg, session.device):
            given = batches[0] if per_step == 1 else batches
            losses = spec.train_step(model_cfg, run_nets, optimizers, given, trainee.state)
        check_finite(losses, trainee.progress.step + 1)
        if session.world > 1:
            average_buffers(trainee.nets, session.world)
        for scheduler in trainee.schedulers.values():
            scheduler.step()
        trainee.progress = dataclasses.replace(trainee.progress, step=trainee.progress.step + 1,
                                               epoch=epoch, batch=index + 1)
        images = sum(b["a" if "a" in b else "b"].shape[0] for b in batches) * session.world
        meter.add(losses, images, waited, time.perf_counter() - start)
        fixed = budget.decide(trainee.progress.step) if budget and not trainee.progress.steps else 0
        if fixed:
            cfg = fix_steps(cfg, trainee, fixed)
        after_step(cfg, session, trainee, tracker, evaluator, meter, decided=bool(fixed))
        if fixed:  # logged once the checkpoint holds it: a restart before that decides afresh
            report_budget(cfg, session, tracker, fixed)
    return finish(cfg, spec, model_cfg, session, trainee, tracker, evaluator)


def start_budget(cfg, spec, session, trainee: Trainee, evaluator, tracker):
    """A Budget when train.max_minutes asks for one and no checkpoint fixed the steps yet. Rank 0
    times an evaluation first (the untrained nets' scores, logged): the budget reserves that time
    for each evaluation still to come."""
    from pipeline.budget import Budget

    if not cfg.train.max_minutes or trainee.progress.steps:
        return None
    generators = len(spec.directions) if cfg.tracking.log_models else 0
    budget = Budget(cfg, session.rank, session.world, generators, session.device, trainee.setup_s)
    if evaluator is not None:
        metrics = budget.time_evaluation(
            lambda: evaluate(cfg, evaluator, trainee.nets, session.device, "eval/"))
        tracker.log_metrics(metrics, trainee.progress.step)
    return budget


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


def report_budget(cfg, session, tracker, steps: int) -> None:
    tracker.log_params({"train.budget_steps": steps})
    if session.rank == 0:
        print(f"budget {cfg.train.max_minutes:g} min: training for {steps} steps", flush=True)


def after_step(cfg, session, trainee: Trainee, tracker, evaluator, meter: Meter,
               decided: bool = False) -> None:
    """Log, evaluate and checkpoint when due; `decided`: a budget just fixed the steps, so both now
    (the checkpoint keeps the decision; the evaluation gives Tune's report its metric)."""
    step, last = trainee.progress.step, trainee.progress.step == cfg.train.steps
    if step % cfg.train.log_every == 0 or last:
        lrs = {f"lr/{k}": o.param_groups[0]["lr"] for k, o in trainee.optimizers.items()}
        tracker.log_metrics({**meter.flush(), **lrs, "progress/epoch": trainee.progress.epoch}, step)
    evaluate_now = (bool(cfg.eval.every) and step % cfg.eval.every == 0) or last or decided
    periodic = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0
    checkpoint_now = periodic or last or decided
    if not (evaluate_now or checkpoint_now):
        return
    metrics = {"step": step}
    if evaluate_now and evaluator is not None:
        trainee.last_eval = evaluate(cfg, evaluator, trainee.nets, session.device, "eval/")
        metrics.update(trainee.last_eval)
        tracker.log_metrics(metrics, step)
        log_grids(cfg, evaluator, trainee.nets, session.device, tracker, step)
    if trainee.resumed_from is not None:  # for Ray's and Tune's results; MLflow has it once
        metrics["progress/resumed_from_step"] = trainee.resumed_from
    directory = save_checkpoint(cfg, session, trainee, tracker) if checkpoint_now else None
    session.report(metrics, directory, step)


def finish(cfg, spec, model_cfg, session, trainee: Trainee, tracker, evaluator) -> dict:
    """Rank 0: test-split metrics, final grids, generators logged and registered; run ended.
    Every rank then joins one last report, which carries the final validation and test metrics to
    Ray's result (a run restored at its last step, e.g. a PBT exploit, evaluates here)."""
    if session.rank == 0 and not trainee.last_eval:
        trainee.last_eval = evaluate(cfg, evaluator, trainee.nets, session.device, "eval/")
    metrics = {"step": trainee.progress.step, **trainee.last_eval}
    if session.rank == 0:
        test = build_evaluator(cfg, spec, model_cfg, session.device, cfg.data.test_split)
        metrics.update(evaluate(cfg, test, trainee.nets, session.device, "test/"))
        metrics.update(test.baselines())
        tracker.log_metrics(metrics, trainee.progress.step)
        log_grids(cfg, test, trainee.nets, session.device, tracker, trainee.progress.step, tag="test_samples")
        register_generators(cfg, spec, model_cfg, trainee.nets, tracker, metrics)
        tracker.end("FINISHED")
    if trainee.resumed_from is not None:
        metrics["progress/resumed_from_step"] = trainee.resumed_from
    session.report(metrics, None, trainee.progress.step)
    return metrics


# ----------------------------------------------------------------------------- entry points


def ray_train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: the config travels as JSON (no pickled objects)."""
    from pipeline.run_config import from_json

    run_training(from_json(config["run"]), RaySession(from_json(config["run"])))


def ray_trainer(cfg):
    """A TorchTrainer for this run: explicit resources per worker, checkpoints kept in the run's
    storage folder, worker failures recovered from the latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import storage
    from pipeline.run_config import to_json

    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    filesystem, path = (storage.arrow_filesystem(cfg.storage.path, cfg.storage.endpoint or None)
                        if storage.is_s3(cfg.storage.path) else (None, cfg.storage.path))
    run_config = ray.train.RunConfig(
        name=cfg.tracking.run_name, storage_path=path, storage_filesystem=filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.checkpoint.keep)),
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        worker_runtime_env={"env_vars": forwarded_env(cfg)},
    )
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker=resources)
    return TorchTrainer(ray_train_worker, train_loop_config={"run": to_json(cfg)},
                        scaling_config=scaling, run_config=run_config)


def forwarded_env(cfg) -> dict:
    """The driver's S3 settings (AWS_*), for workers that read data or write checkpoints on s3://.
    Ray workers otherwise see the raylet's environment, which may predate these settings."""
    from pipeline import storage

    if not (storage.is_s3(cfg.data.path) or storage.is_s3(cfg.storage.path)):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def run_plain(cfg, device=None) -> dict:
    """Without Ray: one process, or each process of `torchrun --nproc_per_node N` (GPU boxes)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.scaling.use_gpu else "gloo")
        if cfg.scaling.use_gpu:
            device = device or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    return run_training(cfg, PlainSession(cfg, device))
