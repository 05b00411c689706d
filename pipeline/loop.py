"""The training loop every worker runs (`run_training`) and its entry points: `run_plain` (no Ray:
one process, or each process of a `torchrun` launch) and `ray_trainer` (Ray Train); a Tune trial
runs it in its own actor (pipeline.search).

The loop owns modes, devices, autocast, data order, schedules, gradient averaging, evaluation,
checkpoints and tracking; the models' free `train_step` does one update and nothing else. Where it
runs is its session (pipeline.session). Its tracker and evaluators come from factories, called
where the loop runs (under Ray: inside the worker, so nothing built in the driver is pickled):
`make_tracker(cfg, rank)`, by default `session.open_tracker` (MLflow on rank 0 of a tracked run),
and `make_evaluator(cfg, spec, model_cfg, device, split)`, by default `loop_eval.build_evaluator`;
an evaluator factory that returns None leaves that split unevaluated.
"""

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any

import torch

from pipeline.batches import batch_stream, prepare_batch, reader_used
from pipeline.loop_eval import build_evaluator, eval_floors, evaluate, log_grids, register_generators
from pipeline.session import PlainSession, RaySession, open_tracker
from pipeline.trainee import (
    UNDECIDED,
    Trainee,
    build_trainee,
    check_channels,
    compiled,
    fix_steps,
    reschedule,
    save_checkpoint,
    set_renorm,
    with_steps,
)


class Meter:
    """Step losses and timings averaged over the logging window. A loss is averaged over the steps
    that reported it (CoGAN updates D every other step). `images` is every image a step consumed:
    all n_critic batches of a DualGAN step, on all workers.

    The losses are the steps' detached device tensors (the step contract), kept as they are until
    `read()` copies all of them to the host at once: one sync per log point or checkpoint instead
    of one per step, so a GPU step never waits for the host. The wait in `read()` counts as busy
    time (it is the steps' own GPU work finishing)."""

    def __init__(self):
        self.sums, self.counts, self.count, self.images, self.wait, self.busy = {}, {}, 0, 0, 0.0, 0.0
        self.pending = []  # (step, {name: 0-dim tensor}) not read yet

    def add(self, losses: dict, images: int, wait: float, total: float, step: int = 0) -> None:
        self.pending.append((step, losses))
        self.count += 1
        self.images += images
        self.wait += wait
        self.busy += total

    def read(self) -> None:
        """The pending losses on the host, in one stacked copy, added to the window's sums; raises
        FloatingPointError naming the first step with a non-finite loss."""
        if not self.pending:
            return
        started = time.perf_counter()
        values = [v for _, losses in self.pending for v in losses.values()]
        host = iter(torch.stack(values).tolist()) if values else iter(())
        pending, self.pending = self.pending, []
        for step, losses in pending:
            read = {k: next(host) for k in losses}
            check_finite(read, step)
            for k, v in read.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        self.busy += time.perf_counter() - started

    def flush(self) -> dict:
        self.read()
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



@contextlib.contextmanager
def autocast(cfg, device):
    if device.type == "cuda" and cfg.scaling.bf16:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield



@dataclasses.dataclass
class Run:
    """One worker's run as its steps see it. `cfg` changes once if a time budget fixes the steps."""

    cfg: Any  # RunConfig
    spec: Any  # ModelSpec
    model_cfg: Any  # the model's Config (the rate is the run's optim.lr)
    session: Any  # pipeline.session.Session
    trainee: Trainee
    tracker: Any  # pipeline.session.Tracker
    evaluator: Any = None  # the validation split's, rank 0 only; None: not evaluated


def run_training(cfg, session, make_tracker=open_tracker, make_evaluator=build_evaluator) -> dict:
    """The loop every worker runs: resume, train, log, evaluate, checkpoint; returns rank 0's final
    metrics. `session` says where it runs (pipeline.session); the factories are the module's."""
    run = start(cfg, session, make_tracker)
    if session.rank == 0:
        open_evaluation(run, make_evaluator)
    train(run, start_budget(run))
    return finish(run, make_evaluator)


def start(cfg, session, make_tracker) -> Run:
    """Build or restore what trains, settle the steps a budget run trains for, open the tracker."""
    from models import MODELS

    spec, model_cfg = MODELS[cfg.model_name], cfg.model
    check_channels(cfg, model_cfg)
    trainee = build_trainee(cfg, spec, model_cfg, session)
    if trainee.progress.steps:  # a budget run restored after its steps were fixed: keep them
        cfg = fix_steps(cfg, trainee, trainee.progress.steps)
    elif cfg.train.max_minutes:  # until the budget decides: no end, no LR decay, Batch Renorm as BN
        cfg = reschedule(with_steps(cfg, UNDECIDED), trainee)
    tracker = make_tracker(cfg, session.rank)
    if trainee.resumed_from is not None:  # a worker restart or --resume: same MLflow run, noted
        tracker.log_metrics({"progress/resumed_from_step": trainee.resumed_from}, trainee.resumed_from)
    return Run(cfg, spec, model_cfg, session, trainee, tracker)


def open_evaluation(run: Run, make_evaluator) -> None:
    """Rank 0: the validation split's evaluator, timed (the test split's costs as much at the end,
    which a budget reserves), and the untrained nets' baselines logged at a fresh start."""
    built = time.perf_counter()
    cfg = run.cfg
    run.evaluator = make_evaluator(cfg, run.spec, run.model_cfg, run.session.device, cfg.data.val_split)
    run.trainee.setup_s = time.perf_counter() - built
    if run.evaluator is not None and run.trainee.progress.step == 0:
        run.tracker.log_metrics(run.evaluator.baselines(), 0)
        if run.evaluator.notes:
            run.tracker.log_text("\n".join(run.evaluator.notes), "evaluation_notes.txt")


def train(run: Run, budget) -> None:
    """Generator updates until train.steps (which a budget fixes on the way); logs, evaluations and
    checkpoints when due."""
    from pipeline.distributed import wrap_optimizers

    session, trainee = run.session, run.trainee
    update = functools.partial(one_step, run, compiled(run.cfg, trainee.nets),
                               wrap_optimizers(trainee.optimizers, session.world))
    per_step = run.spec.batches_per_step(run.model_cfg)  # fresh batches per generator update
    stream, meter = batch_stream(run.cfg, session.world, session.rank, trainee.progress, per_step), Meter()
    used, why = reader_used(run.cfg)  # data.reader=auto decides by size: say what it chose
    run.tracker.log_params({"data.reader_used": used, "data.reader_reason": why})
    channels_last = run.cfg.scaling.channels_last and session.device.type == "cuda"
    if session.device.type == "cuda":  # every batch has the crop's shape: autotuned kernels pay off
        torch.backends.cudnn.benchmark = True
    trainee.nets.train()
    progress = open_progress(run)
    while trainee.progress.step < run.cfg.train.steps:
        start = time.perf_counter()
        drawn = [next(stream) for _ in range(per_step)]
        epoch, index = drawn[-1][0], drawn[-1][1]  # the data position after this step's last batch
        batches = [prepare_batch(run.cfg, batch, session.device, channels_last) for _, _, batch in drawn]
        waited = time.perf_counter() - start
        losses = update(batches)
        trainee.progress = dataclasses.replace(trainee.progress, step=trainee.progress.step + 1,
                                               epoch=epoch, batch=index + 1)
        images = sum(b["a" if "a" in b else "b"].shape[0] for b in batches) * session.world
        meter.add(losses, images, waited, time.perf_counter() - start, trainee.progress.step)
        fixed = budget.decide(trainee.progress.step) if budget and not trainee.progress.steps else 0
        if fixed:
            run.cfg = fix_steps(run.cfg, trainee, fixed)
        logged = after_step(run, meter, decided=bool(fixed))
        if progress:  # losses only as the log points read them: the line adds no host sync
            steps = run.cfg.train.steps
            progress.update(trainee.progress.step, None if steps == UNDECIDED else steps, logged, images)
        if fixed:  # logged once the checkpoint holds it: a restart before that decides afresh
            report_budget(run, fixed)
    if progress:
        progress.close()


def open_progress(run: Run):
    """Rank 0's progress line (pipeline.terminal), unless the session shows its own (Tune's table)."""
    from pipeline.terminal import Progress

    if run.session.rank != 0 or not getattr(run.session, "shows_progress", True):
        return None
    cfg = run.cfg
    progress = Progress(cfg.train.max_minutes * 60.0, cfg.train.started_at or None)
    progress.start(run.trainee.progress.step)
    return progress


def one_step(run: Run, run_nets, optimizers, batches: list) -> dict:
    """One generator update (with whatever discriminator updates the model makes) and its losses,
    still on the device: the Meter reads and checks them at the next log point or checkpoint."""
    from pipeline.distributed import average_buffers

    trainee, session = run.trainee, run.session
    set_renorm(run.cfg, trainee.nets, trainee.progress.step)
    with autocast(run.cfg, session.device):
        given = batches[0] if len(batches) == 1 else batches
        losses = run.spec.train_step(run.model_cfg, run_nets, optimizers, given, trainee.state)
    if session.world > 1:
        average_buffers(trainee.nets, session.world)
    for scheduler in trainee.schedulers.values():
        scheduler.step()
    return losses


def start_budget(run: Run):
    """A Budget when train.max_minutes asks for one and no checkpoint fixed the steps yet. Rank 0
    times an evaluation first (the untrained nets' scores, logged): the budget reserves that time
    for each evaluation still to come."""
    from pipeline.budget import Budget

    cfg, session, trainee = run.cfg, run.session, run.trainee
    if not cfg.train.max_minutes or trainee.progress.steps:
        return None
    generators = len(run.spec.directions) if cfg.tracking.log_models else 0
    budget = Budget(cfg, session.rank, session.world, generators, session.device, trainee.setup_s)
    if run.evaluator is not None:
        metrics = budget.time_evaluation(
            lambda: evaluate(cfg, run.evaluator, trainee.nets, session.device, "eval/"))
        run.tracker.log_metrics(metrics, trainee.progress.step)
    return budget


def report_budget(run: Run, steps: int) -> None:
    run.tracker.log_params({"train.budget_steps": steps})
    if run.session.rank == 0:
        print(f"budget {run.cfg.train.max_minutes:g} min: training for {steps} steps", flush=True)


def after_step(run: Run, meter: Meter, decided: bool = False) -> dict:
    """Log, evaluate and checkpoint when due; `decided`: a budget just fixed the steps, so both now
    (the checkpoint keeps the decision; the evaluation gives Tune's report its metric). Returns the
    losses logged now ({} when this step logged none)."""
    cfg, session, trainee, tracker = run.cfg, run.session, run.trainee, run.tracker
    step, last = trainee.progress.step, trainee.progress.step == cfg.train.steps
    log_now = step % cfg.train.log_every == 0 or last
    evaluate_now = (bool(cfg.eval.every) and step % cfg.eval.every == 0) or last or decided
    periodic = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0
    checkpoint_now = periodic or last or decided
    if log_now or evaluate_now or checkpoint_now:  # the only host syncs of the loop's own
        meter.read()  # raises on a non-finite loss: nothing with it is logged, evaluated or saved
    logged = {}
    if log_now:
        logged = meter.flush()
        lrs = {f"lr/{k}": o.param_groups[0]["lr"] for k, o in trainee.optimizers.items()}
        tracker.log_metrics({**logged, **lrs, "progress/epoch": trainee.progress.epoch}, step)
    if not (evaluate_now or checkpoint_now):
        return logged
    metrics = {"step": step}
    if evaluate_now and run.evaluator is not None:
        trainee.last_eval = evaluate(cfg, run.evaluator, trainee.nets, session.device, "eval/")
        metrics.update(trainee.last_eval)
        metrics.update(eval_floors(run.evaluator))  # beside each evaluation: a trial reads against them
        tracker.log_metrics(metrics, step)
        log_grids(cfg, run.evaluator, trainee.nets, session.device, tracker, step)
    if trainee.resumed_from is not None:  # for Ray's and Tune's results; MLflow has it once
        metrics["progress/resumed_from_step"] = trainee.resumed_from
    directory = save_checkpoint(cfg, session, trainee, tracker) if checkpoint_now else None
    session.report(metrics, directory, step)
    return logged


def finish(run: Run, make_evaluator) -> dict:
    """Rank 0: test-split metrics, final grids, generators logged and registered; run ended.
    Every rank then joins one last report, which carries the final validation and test metrics to
    Ray's result (a run restored at its last step, e.g. a PBT exploit, evaluates here)."""
    cfg, session, trainee, tracker = run.cfg, run.session, run.trainee, run.tracker
    device, step = session.device, trainee.progress.step
    if session.rank == 0 and not trainee.last_eval and run.evaluator is not None:
        trainee.last_eval = evaluate(cfg, run.evaluator, trainee.nets, device, "eval/")
    metrics = {"step": step, **trainee.last_eval}
    if session.rank == 0:
        test = make_evaluator(cfg, run.spec, run.model_cfg, device, cfg.data.test_split)
        if test is not None:
            metrics.update(evaluate(cfg, test, trainee.nets, device, "test/"))
            metrics.update(test.baselines())
        tracker.log_metrics(metrics, step)
        if test is not None:
            log_grids(cfg, test, trainee.nets, device, tracker, step, tag="test_samples")
        register_generators(cfg, run.spec, run.model_cfg, trainee.nets, tracker, metrics, step)
        tracker.end("FINISHED")
    if trainee.resumed_from is not None:
        metrics["progress/resumed_from_step"] = trainee.resumed_from
    session.report(metrics, None, step)
    return metrics


# ----------------------------------------------------------------------------- entry points


def ray_train_worker(config: dict, make_tracker=open_tracker, make_evaluator=build_evaluator) -> None:
    """Ray Train's train_loop_per_worker: the config travels as JSON (no pickled objects); factories
    other than the defaults travel as Ray pickles functions, and are called here, in the worker."""
    from pipeline.run_config import from_json

    cfg = from_json(config["run"])
    match_threads(cfg)
    run_training(cfg, RaySession(cfg), make_tracker, make_evaluator)


def match_threads(cfg) -> int:
    """torch's intra-op threads = the worker's CPUs (at least 1). Ray derives OMP_NUM_THREADS from a
    worker's CPUs only when the variable is unset; a local Ray inherits the driver's environment, so
    a driver started with OMP_NUM_THREADS=1 left 2-CPU workers on one thread, and one with 8 made a
    1-CPU worker fight its neighbours for the cores. On GPU workers torch keeps its own choice."""
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    return torch.get_num_threads()


def ray_trainer(cfg, make_tracker=open_tracker, make_evaluator=build_evaluator):
    """A TorchTrainer for this run: explicit resources per worker, checkpoints kept in the run's
    storage folder, worker failures recovered from the latest checkpoint; each worker runs
    `run_training` with these factories."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import storage
    from pipeline.launch import noisy
    from pipeline.run_config import to_json

    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    filesystem, path = (storage.arrow_filesystem(cfg.storage.path, cfg.storage.endpoint or None)
                        if storage.is_s3(cfg.storage.path) else (None, cfg.storage.path))
    run_config = ray.train.RunConfig(
        name=cfg.tracking.run_name, storage_path=path, storage_filesystem=filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.checkpoint.keep)),
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        worker_runtime_env={"env_vars": forwarded_env(cfg)},
        logging_config=ray.train.LoggingConfig(log_level="INFO" if noisy() else "WARNING"),  # --verbose
    )
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker=resources)
    worker = functools.partial(ray_train_worker, make_tracker=make_tracker, make_evaluator=make_evaluator)
    return TorchTrainer(worker, train_loop_config={"run": to_json(cfg)},
                        scaling_config=scaling, run_config=run_config)


# S3 settings a worker needs that hold no secret. Keys and tokens (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) are never forwarded: Ray writes a runtime env to its logs.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE", "AWS_EC2_METADATA_DISABLED")


def forwarded_env(cfg) -> dict:
    """The driver's telemetry settings, and its S3 settings without credentials (S3_SETTINGS) for
    workers that read data or write checkpoints on s3://. Ray workers otherwise see the raylet's
    environment, which may predate these settings. Credentials come from the worker's own
    environment: a local Ray started by the driver inherits the driver's; a cluster's nodes need
    theirs (environment, a 0600 credentials file, an instance role)."""
    from pipeline import storage
    from pipeline.launch import QUIET

    quiet = {k: os.environ[k] for k in QUIET if k in os.environ}  # the driver's telemetry choice
    if not (storage.is_s3(cfg.data.path) or storage.is_s3(cfg.storage.path)):
        return quiet
    return {**quiet, **{k: os.environ[k] for k in S3_SETTINGS if k in os.environ}}


def run_plain(cfg, device=None, make_tracker=open_tracker, make_evaluator=build_evaluator) -> dict:
    """Without Ray: one process, or each process of `torchrun --nproc_per_node N` (GPU boxes)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.scaling.use_gpu else "gloo")
        if cfg.scaling.use_gpu:
            device = device or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    return run_training(cfg, PlainSession(cfg, device), make_tracker, make_evaluator)
