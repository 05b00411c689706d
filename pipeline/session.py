"""What the training loop talks to: the session it runs in, and the tracker it logs to.

A session says where the loop runs: which rank of how many, on which device, where checkpoints are
restored from and reported to. Three kinds share one protocol (`Session`): `PlainSession` (no Ray:
one process, or a `torchrun` launch), `RaySession` (a Ray Train worker) and `TuneSession` (a Tune
trial's own actor). The two Ray kinds hand checkpoints to Ray (`ReportedSession`).

A tracker is what `run_training`'s tracker factory returns: rank 0 of a tracked run gets an MLflow
tracker (`pipeline.registry.ModelTracker`), every other rank, and every untracked run, a
`NullTracker` whose methods do nothing (`open_tracker`). Nothing here imports Ray or MLflow until a
session or tracker that needs it is made: the plain loop runs on machines without them.
"""

import logging
import os
import shutil
from typing import Protocol

import torch


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def restore(self, load):
        """`load(directory)` on the checkpoint to resume from, or None when there is none."""

    def checkpoint_dir(self, step: int) -> str:
        """Where this rank writes the checkpoint of `step`."""

    def checkpoint_location(self, step: int) -> str:
        """Where a user finds that checkpoint (logged as a tag)."""

    def report(self, metrics: dict, directory: str | None, step: int) -> None:
        """Hand over a step's metrics, with the checkpoint written to `directory` if any."""


class Tracker(Protocol):
    """The methods the loop logs through (`pipeline.registry.ModelTracker` implements them)."""

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dict(self, obj: dict, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None: ...
    def log_image(self, image, artifact_file: str) -> None: ...
    def log_generator(self, artifact, input_example, registered_name=None, metrics=None,
                      step: int = 0) -> dict | None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Ranks other than 0, and runs started without MLflow: every Tracker method, doing nothing."""

    run_id = None

    def __getattr__(self, name):
        if name.startswith("_") or not hasattr(Tracker, name):
            raise AttributeError(name)  # a misspelt method fails here as it would on MLflow
        return _nothing


def _nothing(*args, **kwargs):
    return None


def open_tracker(cfg, rank: int):
    """The default tracker factory: MLflow for rank 0 of a run with a run id, else a NullTracker."""
    if rank != 0 or not cfg.tracking.run_id:
        return NullTracker()
    from pipeline.registry import ModelTracker

    return ModelTracker(cfg.tracking.uri, cfg.tracking.run_id)


# ----------------------------------------------------------------------------- sessions


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
        from pipeline.checkpoint import restore_newest

        return restore_newest(self.root, load)

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


class ReportedSession:
    """A session whose checkpoints are written to a staging folder and handed to Ray (Train or
    Tune) with the report, which copies them into the run's storage; the staging folder goes after."""

    def checkpoint_dir(self, step: int) -> str:
        from pipeline.checkpoint import staging_dir

        return staging_dir()

    def report(self, metrics: dict, directory: str | None, step: int) -> None:
        self._report(metrics, directory, step)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def ray_info_off(record: logging.LogRecord) -> bool:
    """A handler filter dropping Ray's own INFO lines that reach the root logger: Ray Train's
    worker logs each report under a logger named by its file path (ray/train/v2/.../context.py),
    which its LoggingConfig level does not cover."""
    return record.levelno >= logging.WARNING or f"{os.sep}ray{os.sep}" not in record.name


class RaySession(ReportedSession):
    """Inside a Ray Train worker: ranks from the train context, checkpoints through ray.train.report
    (Ray merges every rank's files into one checkpoint directory in the run's storage)."""

    def __init__(self, cfg):
        import ray.train
        import ray.train.torch

        from pipeline.launch import noisy

        context = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if not noisy():  # Ray Train logs every report, all its metrics, at INFO on the worker: -v only
            for handler in logging.getLogger().handlers:
                handler.addFilter(ray_info_off)

    def restore(self, load):
        """The newer of Ray's record and the newest intact checkpoint in the run's storage folder:
        a worker killed after its checkpoint was written but before Ray registered it would
        otherwise redo those steps (or all of them, from step 0)."""
        import ray.train

        from pipeline import storage
        from pipeline.checkpoint import restore_newest

        root = storage.join(self.cfg.storage.path, self.cfg.tracking.run_name)
        return restore_newest(root, load, self.cfg.storage.endpoint or None, ray.train.get_checkpoint())

    def checkpoint_location(self, step: int) -> str:
        return checkpoint_uri(self.cfg, step)

    def _report(self, metrics: dict, directory: str | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        name = f"checkpoint_{step:08d}" if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def tune_checkpoint_uri(store) -> str:
    """The URI of the checkpoint a Tune trial reports next, from its StorageContext: Tune numbers a
    trial's checkpoints checkpoint_000000, 000001, ... and raises the index as it persists one."""
    root = store.storage_fs_path
    if store.storage_filesystem.type_name == "s3":
        root = "s3://" + root
    name = store._make_checkpoint_dir_name(store.current_checkpoint_index + 1)
    return "/".join([root.rstrip("/"), store.experiment_dir_name, store.trial_dir_name, name])


class TuneSession(ReportedSession):
    """The training loop inside one Tune trial actor: rank 0 of 1, checkpoints reported to Tune."""

    rank, world = 0, 1
    shows_progress = False  # many trials at once: Tune's own table reports them

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")

    def restore(self, load):
        from ray import tune

        return load_reported(tune.get_checkpoint(), load)

    def checkpoint_location(self, step: int) -> str:
        """Where Tune will persist the checkpoint reported next: <storage>/<search>/<trial>/
        checkpoint_<index> (the trial's own folder, not Ray's session folder that holds its logs)."""
        from ray import tune

        return tune_checkpoint_uri(tune.get_context().get_storage())

    def _report(self, metrics: dict, directory: str | None, step: int) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(directory) if directory else None
        tune.report(metrics, checkpoint=checkpoint)
