"""The job: what the caller asks for (`Job`), and the same job made complete by planning (`Work`),
whose key decides which earlier outputs a rerun may keep."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from models import MODELS
from pipeline.generator_artifact import GeneratorArtifact
from pipeline.translate.core import BN_MODES, resolved_mode
from pipeline.translate.model import ModelInfo

FORMATS = {"png": ".png", "jpeg": ".jpg", "parquet": ".parquet"}
Z_MODES = ("random", "linear", "zero")
MODES = ("local", "ray", "auto")


@dataclass(frozen=True)
class Settings:
    """What an output depends on besides the model; a change redoes the outputs."""

    format: str = "png"
    bn_mode: str = "auto"  # one of BN_MODES
    z_mode: str = "random"  # multimodal models (BicycleGAN)
    seed: int = 0
    keep_size: bool = True
    dropout: bool = False  # pix2pix's test script: dropout on at test time

    def check(self, model_name: str, samples: int) -> None:
        multimodal = MODELS[model_name].multimodal
        problems = [
            (self.format not in FORMATS, f"format must be one of {list(FORMATS)}, got {self.format!r}"),
            (self.bn_mode not in BN_MODES, f"bn mode must be one of {BN_MODES}, got {self.bn_mode!r}"),
            (self.z_mode not in Z_MODES, f"z mode must be one of {Z_MODES}, got {self.z_mode!r}"),
            (samples < 1, f"samples must be >= 1, got {samples}"),
            (samples > 1 and not multimodal, f"--samples is for multimodal models such as BicycleGAN "
                                              f"(one output per z); {model_name} has one output per input"),
            (samples > 1 and self.z_mode == "zero", "--z zero gives one output per input: use --samples 1"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


@dataclass
class Task:
    """One input with the samples it still needs."""

    id: str  # folder: path relative to the input; dataset: its row id; CoGAN: pair-NNNNNN
    sha256: str | None  # of the input's bytes (None for CoGAN)
    name: str  # output path without suffix
    samples: list[int]
    uri: str | None = None  # folder inputs: where to read the bytes


@dataclass(frozen=True)
class Job:
    """What the caller asks for. It has no key: what the outputs depend on is complete only once
    `resolve` has looked at the input (an aligned dataset adds the half the model reads)."""

    generator: GeneratorArtifact
    info: ModelInfo  # which generator: recorded with every output
    output: str
    settings: Settings = Settings()
    samples: int = 1
    batch_size: int = 16
    device: str = "cpu"
    bf16: bool = True
    io_workers: int = 1  # threads decoding and encoding beside the net (pillow releases the GIL)
    endpoint: str | None = None
    half: str | None = None  # folder of pair images: "a" (left), "b" (right) or "whole"; None: detect


@dataclass(frozen=True)
class Work:
    """A job made complete by `resolve`: what every worker needs (picklable: Ray sends it to each
    actor). Its key derives from its frozen fields, so the key the output index is filtered by when the
    folder is opened is the key every output is recorded under."""

    job: Job
    half: str | None = None  # aligned rows or pair images: the half the model reads ("left" | "right")
    half_reason: str = field(default="", compare=False)  # why that half (or none): printed and recorded
    tasks: dict = field(default_factory=dict, compare=False)  # id -> Task, filled by `plan`

    @property
    def key(self) -> str:
        """Outputs listed under another key were made another way: a rerun redoes them."""
        job, generator, settings = self.job, self.job.generator, self.job.settings
        z = {"z": settings.z_mode, "seed": settings.seed} if generator.spec.draws_z else {}
        if settings.z_mode == "linear":
            z["samples"] = job.samples  # the grid's points depend on K
        parts = {"model": job.info.key, "direction": generator.direction, "size": generator.size,
                 "half": self.half, "format": settings.format, "bn_mode": self.bn_mode,
                 "keep_size": settings.keep_size, **z}
        if settings.dropout:  # only then, so that folders made before the option keep their key
            parts["dropout"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def bn_mode(self) -> str:
        """The inference mode the outputs are made in: settings.bn_mode resolved for the model, so
        that "auto" and the mode it stands for make the same outputs under the same key."""
        return resolved_mode(self.job.generator, self.job.settings.bn_mode)

    def lineage(self) -> dict:
        generator, info = self.job.generator, self.job.info
        return {"model": info.name, "model_version": info.version, "run_id": info.run_id,
                "model_uri": info.uri, "model_key": info.key, "model_type": generator.model_name,
                "direction": generator.direction, "bn_mode": self.bn_mode,
                "dropout": self.job.settings.dropout, "job_key": self.key}


def entry_key(identity: str, sample: int) -> str:
    return f"{identity}/{sample}"


@dataclass(frozen=True)
class RunOptions:
    """How a job runs; none of it changes what the outputs are."""

    pairs: int = 0  # CoGAN: pairs to generate
    overwrite: bool = False  # redo every output
    mode: str = "local"  # MODES: this process, Ray actors, or Ray above the crossover (runner.crossover)
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    progress: bool = True
    command: str = ""  # recorded with the run
    ran: str = ""  # where it runs and why ("on Ray: 2 actors (--ray)", "in-process: --no-ray"), recorded
    commit_every_s: float = 1.0
    start_ray: Callable[[], object] | None = None  # starts or joins Ray once a run needs it (default: init)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
