"""Batch translation: one trained generator over many images, incremental, with lineage per output.

Three layers, so that the core also runs where Ray does not (a bare GPU box, the benchmark):

- the plain-torch core: `load_model` (driver side: a registered model, a run's model or a training
  checkpoint -> `ModelPayload`: weights, config, training image size and lineage) and `Translator`
  (holds the net once; resizes a batch of decoded images to the model's size and channels,
  translates in the inference mode `bn_mode` asks for, and brings each output back to its
  input's size). bn_mode "auto" (the default) follows the papers' test scripts: a batch-norm
  generator translates each image alone, normalised by its own statistics, so an output never
  depends on the rest of its batch; any other norm runs in eval mode. "per_image", "eval"
  (running statistics) and "train" (batch statistics over the batch, dropout on; flags and
  buffers restored) choose one outright (`models.norms`);
- the job: `plan` lists the inputs (a Parquet dataset made by prepare_data.py, or a folder of
  images read as ingest would read them; local or s3://), hashes them and keeps only the
  (input, sample) pairs the output manifest does not list yet; `BatchTranslator` reads, decodes,
  translates, encodes and writes one batch and returns a lineage entry per output; `run` feeds it
  in this process or through Ray Data (`map_batches` over an actor pool: one generator per actor)
  and commits the manifest after each block;
- the output folder (`Outputs`): PNG or JPEG files named after their inputs (subfolders kept;
  BicycleGAN adds `_s<k>` per sample, CoGAN writes `pair-NNNNNN` with a|b side by side), or Parquet
  shards, and `_manifest.json`, which maps "<input sha256>/<sample>" to the output and its lineage
  (model name, version, run id, input id and sha256, direction, z seed, sample).

Why a rerun is safe: every output is written atomically (temp name then rename; an S3 object
appears whole) and enters the manifest only once it exists; the manifest is replaced atomically
too. Each run first makes the folder agree with its manifest: entries made by another model
version or other settings are dropped (that model's outputs are redone), and files the manifest
does not list (what a killed run wrote after its last commit) are removed. So a killed run leaves
only complete files, the rerun redoes exactly what is unlisted, and every listed (input, sample)
has exactly one output. Inputs that cannot be decoded are listed under "rejected" by sha256 and
not tried again until their content changes. Two runs must not write one folder at once: the
schedules in infra/ avoid overlaps, and a run stops if a later run has claimed its folder.
"""

import hashlib
import io
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from models import MODELS
from models.bicyclegan import interpolation_z
from models.norms import inference_mode, run_generator
from pipeline import data, images, storage
from pipeline.config import from_dict, to_dict
from pipeline.evaluation import to_rgb

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
KIND = "transmute.translations"
RUN_FILE = ".translate-run.json"  # the run writing the folder now (hidden: never taken for an output)
SCHEMA_VERSION = 1
FORMATS = {"png": ".png", "jpeg": ".jpg", "parquet": ".parquet"}
BN_MODES = ("auto", "per_image", "eval", "train")
Z_MODES = ("random", "linear", "zero")
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".parquet")  # what a run may remove when unlisted
PNG_LEVEL = 3  # zlib level: about twice as fast as pillow's default 6, for a few % more bytes
KEPT_RUNS = 20  # run records kept in the manifest
HASH_THREADS = 16  # hashing folder inputs waits on reads (S3), not on the CPU


class OutputError(ValueError):
    """The output folder cannot be used; the message says what to do."""


# ============================================================================= the model


@dataclass
class ModelInfo:
    """Who made an output: recorded with every output; `key` decides what a rerun may reuse."""

    name: str
    version: str | None
    run_id: str | None
    uri: str  # as asked for, e.g. models:/facades-ab@production
    key: str  # these weights: models:/NAME/VERSION, or weights:<sha256 of the tensors>


@dataclass
class ModelPayload:
    """Everything a worker needs to rebuild the generator, without MLflow or the checkpoint."""

    model_name: str
    config: dict
    direction: str
    net_name: str
    weights: dict  # state dict, CPU tensors
    info: ModelInfo
    size: int | None  # the training image size (crop, else load size); None: not recorded
    swap_ab: bool = False  # trained on the right half of aligned pairs as domain a


def load_model(ref: str, tracking_uri: str | None = None, direction: str | None = None,
               size: int | None = None) -> ModelPayload:
    """A registered or logged generator (`models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `runs:/RUN/generator_ab`, a directory holding generator.json) or a training checkpoint (a
    checkpoint folder or a run folder of them: `direction` picks its generator). `size` is used
    only for a model that does not record its training size."""
    if os.path.isdir(ref) and _checkpoint_folder(ref):
        payload = _from_checkpoint(_checkpoint_folder(ref), direction)
    else:
        payload = _from_tracking(ref, tracking_uri)
    if direction and direction != payload.direction:
        raise ValueError(f"model {ref} translates {payload.direction!r}, not --direction {direction!r}: "
                         f"use the model registered for {direction!r} (e.g. its name ending -{direction})")
    spec = MODELS[payload.model_name]
    if spec.name == "cogan":
        return replace(payload, size=payload.config["image_size"])
    if payload.size and size and size != payload.size:
        raise ValueError(f"model {ref} was trained at {payload.size}px; --size {size} does not fit it "
                         "(inputs of any size are resized to the model's size: drop --size)")
    if not (payload.size or size):
        raise ValueError(f"model {ref} records no training image size (no MLflow run or config): "
                         "pass --size")
    return replace(payload, size=payload.size or size)


def _checkpoint_folder(path: str) -> str | None:
    from pipeline.checkpoint import NETS, latest_local

    return path if os.path.exists(os.path.join(path, NETS)) else latest_local(path)


def _from_checkpoint(folder: str, direction: str | None) -> ModelPayload:
    from pipeline.checkpoint import META, load_nets, net_tensors, read_config_json
    from pipeline.run_config import from_json

    cfg = from_json(read_config_json(folder))
    spec = MODELS[cfg.model_name]
    direction = direction or spec.directions[0]
    if direction not in spec.directions:
        raise ValueError(f"checkpoint {folder} ({cfg.model_name}) has directions {spec.directions}, "
                         f"not {direction!r}")
    nets = spec.build_nets(cfg.model)
    load_nets(folder, nets)
    weights = net_tensors(nets[spec.generator_for[direction]])
    meta_path = os.path.join(folder, META)
    meta = json.loads(open(meta_path).read()) if os.path.exists(meta_path) else {}
    info = ModelInfo(cfg.tracking.run_name or os.path.basename(os.path.dirname(folder)),
                     os.path.basename(folder), meta.get("run_id"), os.path.abspath(folder),
                     weights_key(weights))
    size = cfg.data.crop_size or cfg.data.load_size or None
    return ModelPayload(cfg.model_name, to_dict(cfg.model), direction, spec.generator_for[direction],
                        weights, info, size, cfg.data.swap_ab)


def _from_tracking(ref: str, tracking_uri: str | None) -> ModelPayload:
    from pipeline import registry, tracking

    registry.check_model_uri(tracking_uri, ref)
    generator = registry.load_generator(ref, tracking_uri)
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.net.state_dict().items()}
    registered = ref.startswith("models:/") and generator.version is not None
    name = registry.split_model_uri(ref)[0] if registered else ref
    key = f"models:/{name}/{generator.version}" if registered else weights_key(weights)
    params = tracking.get_run_params(tracking_uri, generator.run_id) if generator.run_id else {}
    size = int(params.get("data.crop_size") or 0) or int(params.get("data.load_size") or 0) or None
    info = ModelInfo(name, generator.version, generator.run_id, ref, key)
    return ModelPayload(generator.model_name, to_dict(generator.config), generator.direction,
                        generator.net_name, weights, info, size, params.get("data.swap_ab") == "True")


def weights_key(weights: dict) -> str:
    """The identity of unregistered weights: sha256 over the sorted tensors."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights:" + digest.hexdigest()[:16]


def model_channels(model_name: str, cfg, direction: str) -> tuple[int | None, int]:
    """(input channels, output channels); CoGAN takes no image and writes a|b side by side."""
    a, b = cfg.channels_a, cfg.channels_b
    if model_name == "cogan":
        return None, a if a == b else 3
    return (a, b) if direction == "ab" else (b, a)


# ============================================================================= the plain-torch core


class Translator:
    """One generator, loaded once: uint8 H×W×C images in, uint8 images out.

    Inputs are resized (bicubic, as at ingest) to the model's training size and given as float
    N×C×S×S in [-1, 1]; outputs come back as uint8 N×S×S×C, or each at its input's size. On a GPU
    the net runs in channels-last layout under bf16 autocast. `bn_mode` is the inference mode
    (`mode` holds it resolved for this model); `dropout=True` keeps dropout on (pix2pix's test
    script), so outputs then vary from call to call."""

    def __init__(self, payload: ModelPayload, device="cpu", bn_mode: str = "auto", bf16: bool = True,
                 dropout: bool = False):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.payload, self.bn_mode, self.size, self.dropout = payload, bn_mode, payload.size, dropout
        self.spec = MODELS[payload.model_name]
        self.cfg = from_dict(self.spec.Config, payload.config)
        self.mode = resolved_mode(payload, bn_mode)
        self.device = torch.device(device)
        net = self.spec.build_nets(self.cfg)[payload.net_name]
        net.load_state_dict(payload.weights)
        net = net.to(self.device).eval()
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # one input shape all run long: autotune it once
        self.net = net.to(memory_format=torch.channels_last) if self.cuda else net
        self.nets = {payload.net_name: self.net}
        self.autocast = self.cuda and bf16
        self.in_channels, self.out_channels = model_channels(payload.model_name, self.cfg, payload.direction)

    def to_tensor(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """uint8 H×W×C images of any sizes -> float N×C×S×S in [-1, 1] on the device."""
        x = torch.from_numpy(np.stack([images.resize_array(p, self.size) for p in pixels]))
        if self.cuda:  # uint8 crosses the bus (a quarter of float32) and is converted there
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last if self.cuda else torch.contiguous_format)

    def forward(self, x: torch.Tensor | None, z: torch.Tensor | None = None) -> torch.Tensor:
        """The model's translation (CoGAN: its pair, a|b side by side) in the chosen mode. Every
        flag and batch-norm buffer is as before afterwards (train mode included)."""
        if z is not None:
            z = z.to(self.device)
        run = lambda xi, zi: self.spec.translate(self.cfg, self.nets, xi, self.payload.direction, zi)  # noqa: E731
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            y = run_generator(run, self.net, x, z, self.mode, self.dropout)
        return side_by_side(*y) if isinstance(y, tuple) else y

    @staticmethod
    def to_pixels(y: torch.Tensor) -> np.ndarray:
        """float N×C×H×W in [-1, 1] -> uint8 N×H×W×C on the CPU (converted before the copy)."""
        y = y.float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def translate(self, pixels: list[np.ndarray], z: torch.Tensor | None = None,
                  keep_size: bool = True) -> list[np.ndarray]:
        out = self.to_pixels(self.forward(self.to_tensor(pixels), z))
        if not keep_size:
            return list(out)
        return [resize_to(o, p.shape[0], p.shape[1]) for o, p in zip(out, pixels, strict=True)]

    def generate(self, z: torch.Tensor) -> list[np.ndarray]:
        """CoGAN: one a|b pair per row of z."""
        return list(self.to_pixels(self.forward(None, z)))


def resolved_mode(payload: ModelPayload, bn_mode: str) -> str:
    """per_image | eval | train: `bn_mode` for this model ("auto" picks by the generator's norm)."""
    spec = MODELS[payload.model_name]
    return inference_mode(spec.generator_norm(from_dict(spec.Config, payload.config)), bn_mode)


def side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[1] != b.shape[1]:
        a, b = to_rgb(a), to_rgb(b)
    return torch.cat([a, b], dim=3)


def resize_to(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 H×W×C -> height×width×C, bicubic (no copy when the size already fits)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    gray = pixels.shape[2] == 1
    out = np.asarray(Image.fromarray(pixels[:, :, 0] if gray else pixels).resize(
        (width, height), Image.Resampling.BICUBIC))
    return out[:, :, None] if gray else out


def decode_input(blob: bytes, channels: int) -> np.ndarray:
    """An image file as ingest would take it (images.check_image's rules: EXIF orientation,
    palettes, 16-bit, alpha, ...), decoded once when it needs none of them; raises images.Rejected."""
    img = images.open_image(blob)
    if img.mode not in ("L", "RGB") or img.getexif().get(images.EXIF_ORIENTATION, 1) not in (None, 1):
        img = images.open_image(images.check_image(blob, channels).data)
    want = "L" if channels == 1 else "RGB"
    pixels = np.asarray(img if img.mode == want else img.convert(want))
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def encode_output(pixels: np.ndarray, fmt: str, lineage: dict) -> bytes:
    """PNG (lossless) or JPEG bytes carrying their lineage: a PNG text chunk / a JPEG comment
    named "transmute" holding the lineage JSON, so a file copied elsewhere still says where it
    came from."""
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    text = json.dumps(lineage, sort_keys=True)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=images.JPEG_QUALITY, comment=("transmute:" + text).encode())
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("transmute", text)
        img.save(buf, "PNG", pnginfo=info, compress_level=PNG_LEVEL)
    return buf.getvalue()


# ============================================================================= latents


def z_seed(seed: int, identity: str, sample: int) -> int:
    """A seed per (input, sample), stable across runs and machines (idempotent reruns); < 2**56
    so that it fits every int64 column and torch.manual_seed."""
    digest = hashlib.sha256(f"{seed}:{identity}:{sample}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def latent(nz: int, mode: str, seed: int, identity: str, sample: int, samples: int):
    """(z 1×nz, z_seed, z_t) for one output. random: z ~ N(0, I) from z_seed, the draw the served
    pyfunc model makes for params={"z_seed": z_seed}; linear: seed 001's grid, point t = k/(K-1)
    on the segment between two ends drawn from z_seed; zero: the mean output."""
    if mode == "zero":
        return torch.zeros(1, nz), None, None
    if mode == "random":
        s = z_seed(seed, identity, sample)
        return torch.randn(1, nz, generator=torch.Generator().manual_seed(s)), s, None
    s = z_seed(seed, identity, -1)
    grid = interpolation_z(nz, samples, generator=torch.Generator().manual_seed(s))
    return grid[sample:sample + 1], s, sample / max(samples - 1, 1)


# ============================================================================= the job


@dataclass(frozen=True)
class Settings:
    """What an output depends on besides the model; a change redoes the outputs."""

    format: str = "png"
    bn_mode: str = "auto"  # one of BN_MODES
    z_mode: str = "random"  # BicycleGAN
    seed: int = 0
    keep_size: bool = True
    dropout: bool = False  # pix2pix's test script: dropout on at test time

    def check(self, model_name: str, samples: int) -> None:
        problems = [
            (self.format not in FORMATS, f"format must be one of {list(FORMATS)}, got {self.format!r}"),
            (self.bn_mode not in BN_MODES, f"bn mode must be one of {BN_MODES}, got {self.bn_mode!r}"),
            (self.z_mode not in Z_MODES, f"z mode must be one of {Z_MODES}, got {self.z_mode!r}"),
            (samples < 1, f"samples must be >= 1, got {samples}"),
            (samples > 1 and model_name != "bicyclegan",
             f"--samples is for BicycleGAN (one output per z); {model_name} has one output per input"),
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


@dataclass
class Job:
    """What every worker needs (picklable: Ray sends it to each actor)."""

    payload: ModelPayload
    output: str
    settings: Settings = Settings()
    samples: int = 1
    half: str | None = None  # aligned dataset rows: the half the model reads ("left" | "right")
    batch_size: int = 16
    device: str = "cpu"
    bf16: bool = True
    io_workers: int = 1  # threads decoding and encoding beside the net (pillow releases the GIL)
    s3_endpoint: str | None = None
    tasks: dict = field(default_factory=dict)  # id -> Task, filled by `plan`

    @property
    def key(self) -> str:
        """Outputs listed under another key were made another way: a rerun redoes them."""
        z = {"z": self.settings.z_mode, "seed": self.settings.seed} if self.payload.model_name in (
            "bicyclegan", "cogan") else {}
        if self.settings.z_mode == "linear":
            z["samples"] = self.samples  # the grid's points depend on K
        payload, settings = self.payload, self.settings
        parts = {"model": payload.info.key, "direction": payload.direction, "size": payload.size,
                 "half": self.half, "format": settings.format, "bn_mode": self.bn_mode,
                 "keep_size": settings.keep_size, **z}
        if settings.dropout:  # only then, so that folders made before the option keep their key
            parts["dropout"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def bn_mode(self) -> str:
        """The inference mode the outputs are made in: settings.bn_mode resolved for the model, so
        that "auto" and the mode it stands for make the same outputs under the same key."""
        return resolved_mode(self.payload, self.settings.bn_mode)

    def lineage(self) -> dict:
        info = self.payload.info
        return {"model": info.name, "model_version": info.version, "run_id": info.run_id,
                "model_uri": info.uri, "model_key": info.key, "model_type": self.payload.model_name,
                "direction": self.payload.direction, "bn_mode": self.bn_mode,
                "dropout": self.settings.dropout, "job_key": self.key}


class BatchTranslator:
    """Rows of one batch -> written outputs and one lineage entry each (or a rejection per
    unreadable input). The Ray Data actor class (the generator is built once per actor) and the
    local loop's worker alike."""

    def __init__(self, job: Job):
        self.job, self.lineage = job, job.lineage()
        self.translator = Translator(job.payload, job.device, job.settings.bn_mode, job.bf16,
                                     job.settings.dropout)
        self.pool = ThreadPoolExecutor(job.io_workers) if job.io_workers > 1 else None

    def __call__(self, batch: dict) -> dict:
        """Ray Data's numpy batch in; one JSON entry per output (or rejection) out."""
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        return {"entry": np.array([json.dumps(e) for e in self.process(rows)], dtype=object)}

    def process(self, rows: list[dict]) -> list[dict]:
        work = [(self.job.tasks[str(r["id"])], r) for r in rows if str(r["id"]) in self.job.tasks]
        if self.translator.spec.name == "cogan":
            return self._write([(task, None, k, None) for task, _ in work for k in task.samples])
        entries, items = [], []
        for task, sha, pixels, reason in self._map(self._read, work):
            if reason:
                entries.append({"status": "rejected", "input_id": task.id, "input_sha256": sha,
                                "reason": reason})
            else:
                items += [(task, sha, k, pixels) for k in task.samples]
        return entries + self._write(items)

    def _map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items)) if self.pool else [fn(i) for i in items]

    def _read(self, work: tuple) -> tuple:
        """(task, sha256, pixels, None), or (task, sha256, None, reason) for an unusable input."""
        task, row = work
        try:
            blob = row["image"] if "image" in row else storage.read_bytes(task.uri, self.job.s3_endpoint)
        except OSError as e:
            return task, task.sha256, None, f"cannot read: {e}"
        sha = str(row["sha256"]) if "sha256" in row else data.sha256(blob)  # a file may change after planning
        try:
            pixels = decode_input(blob, self.translator.in_channels)
        except images.Rejected as e:
            return task, sha, None, str(e)
        except (OSError, SyntaxError, ValueError) as e:  # pillow fails in Image.open on a cut header
            return task, sha, None, f"cannot decode: {e}"
        return task, sha, cut_half(pixels, self.job.half), None

    def _write(self, items: list[tuple]) -> list[dict]:
        entries = []
        for start in range(0, len(items), self.job.batch_size):
            chunk = items[start:start + self.job.batch_size]
            entries += self._store(chunk, self._translate(chunk))
        return entries

    def _translate(self, chunk: list[tuple]) -> list[tuple[np.ndarray, dict]]:
        """(output pixels, lineage) per item."""
        model, job = self.translator, self.job
        zs, lineage = [], []
        for task, sha, k, _ in chunk:
            z, seed, t = (None, None, None)
            if model.spec.name in ("bicyclegan", "cogan"):
                z, seed, t = latent(model.cfg.nz, job.settings.z_mode, job.settings.seed, sha or task.id, k,
                                    job.samples)
                zs.append(z)
            lineage.append({**self.lineage, "key": entry_key(sha or task.id, k), "input_id": task.id,
                            "input_sha256": sha, "input_part": job.half, "sample": k, "z_seed": seed,
                            "z_t": t})
        z = torch.cat(zs) if zs else None
        if model.spec.name == "cogan":
            outputs = model.generate(z)
        else:
            outputs = model.translate([p for *_, p in chunk], z, job.settings.keep_size)
        return list(zip(outputs, lineage, strict=True))

    def _store(self, chunk: list[tuple], results: list[tuple]) -> list[dict]:
        fmt = self.job.settings.format
        suffix = FORMATS[fmt]
        named = []
        for (task, *_), (pixels, lineage) in zip(chunk, results, strict=True):
            sample = f"_s{lineage['sample']}" if self.translator.spec.name == "bicyclegan" else ""
            output_id = task.name + sample
            named.append((output_id, pixels, {**lineage, "name": task.name, "output_id": output_id,
                                              "file": output_id + suffix, "height": int(pixels.shape[0]),
                                              "width": int(pixels.shape[1])}))
        if fmt == "parquet":
            return self._store_shard(named)
        return self._map(self._store_file, named)

    def _store_file(self, item: tuple) -> dict:
        _, pixels, entry = item
        blob = encode_output(pixels, self.job.settings.format, entry)
        storage.write_bytes(storage.join(self.job.output, entry["file"]), blob, self.job.s3_endpoint)
        return {**entry, "status": "ok"}

    def _store_shard(self, named: list[tuple]) -> list[dict]:
        blobs = self._map(lambda item: encode_output(item[1], "png", item[2]), named)
        rows = [{**{k: entry.get(k) for k in OUTPUT_SCHEMA.names}, "image": blob, "format": "png",
                 "channels": int(pixels.shape[2])}
                for (_, pixels, entry), blob in zip(named, blobs, strict=True)]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="none")
        shard = f"part-{data.sha256(buf.getvalue())[:16]}.parquet"
        storage.write_bytes(storage.join(self.job.output, shard), buf.getvalue(), self.job.s3_endpoint)
        return [{**entry, "file": shard, "status": "ok"} for _, _, entry in named]


OUTPUT_SCHEMA = pa.schema([
    ("output_id", pa.string()), ("image", pa.binary()), ("format", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("channels", pa.int8()), ("key", pa.string()), ("input_id", pa.string()),
    ("input_sha256", pa.string()), ("input_part", pa.string()), ("sample", pa.int32()),
    ("z_seed", pa.int64()), ("z_t", pa.float64()), ("model", pa.string()), ("model_version", pa.string()),
    ("run_id", pa.string()), ("model_uri", pa.string()), ("model_key", pa.string()),
    ("model_type", pa.string()), ("direction", pa.string()), ("bn_mode", pa.string()),
    ("job_key", pa.string()),
])


def entry_key(identity: str, sample: int) -> str:
    return f"{identity}/{sample}"


def cut_half(pixels: np.ndarray, half: str | None) -> np.ndarray:
    if half is None:
        return pixels
    middle = pixels.shape[1] // 2
    return pixels[:, :middle] if half == "left" else pixels[:, middle:]


# ============================================================================= the output folder


class Outputs:
    """The output folder and its `_manifest.json`; only the driver writes the manifest."""

    def __init__(self, root: str, endpoint: str | None = None):
        self.root, self.endpoint = root, endpoint
        self.manifest: dict = {}
        self.last_commit = 0.0
        self.token = uuid.uuid4().hex

    @property
    def entries(self) -> dict:
        return self.manifest["entries"]

    @property
    def rejected(self) -> dict:
        """input sha256 -> {input_id, reason}: inputs that cannot be decoded are not tried again
        until their content changes (a new sha256)."""
        return self.manifest["rejected"]

    def open(self, job: Job, header: dict, overwrite: bool = False) -> None:
        """Load or start the manifest, drop what this job would make differently, commit, and
        remove every output file the manifest does not list."""
        self.manifest = self._load() or self._refuse_foreign()
        claim = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        storage.write_bytes(self._run_file(), json.dumps(claim).encode(), self.endpoint)
        old = self.manifest.get("entries", {})
        kept = {} if overwrite else {k: e for k, e in old.items() if e.get("job_key") == job.key}
        if len(kept) < len(old):
            log.info("%d earlier outputs were made %s: redoing them", len(old) - len(kept),
                     "before --overwrite" if overwrite else "by another model version or other settings")
        rejected = {} if overwrite else {k: r for k, r in self.manifest.get("rejected", {}).items()
                                         if r.get("job_key") == job.key}
        self.manifest = {"schema_version": SCHEMA_VERSION, "kind": KIND, **header, "entries": kept,
                         "rejected": rejected, "runs": self.manifest.get("runs", [])}
        self.commit()
        self.clean()

    def _load(self) -> dict | None:
        uri = storage.join(self.root, MANIFEST)
        if not storage.is_file(uri, self.endpoint):
            return None
        manifest = json.loads(storage.read_bytes(uri, self.endpoint))
        if (manifest.get("kind"), manifest.get("schema_version")) != (KIND, SCHEMA_VERSION):
            raise OutputError(f"{storage.public_uri(uri)} is not a translation manifest of schema "
                              f"{SCHEMA_VERSION}: choose another --output")
        return manifest

    def _refuse_foreign(self) -> dict:
        """A folder without our manifest must be empty: the clean-up would remove files in it."""
        files = visible_files(self.root, self.endpoint)
        if files:
            raise OutputError(f"--output {storage.public_uri(self.root)} holds {len(files)} files (e.g. "
                              f"{files[0]}) but no {MANIFEST}: it is not a translation output; choose an "
                              "empty or new folder")
        return {}

    def clean(self) -> list[str]:
        """Remove output and temp files that the manifest does not list (a killed run's leftovers,
        outputs of dropped entries); returns them."""
        listed = {e["file"] for e in self.entries.values()}
        stray = [f for f in storage.list_files(self.root, self.endpoint)
                 if f != MANIFEST and f not in listed
                 and (f.lower().endswith(OUTPUT_SUFFIXES) or data.TEMP_NAME.search(f))]
        for rel in stray:
            storage.remove(storage.join(self.root, rel), self.endpoint)
        if stray:
            log.info("removed %d unlisted files from %s", len(stray), storage.public_uri(self.root))
        return stray

    def add(self, entries: list[dict], job_key: str) -> None:
        for entry in entries:
            if entry["status"] == "ok":
                self.entries[entry["key"]] = {k: v for k, v in entry.items() if k not in ("key", "status")}
            elif entry["input_sha256"]:  # unreadable now (no hash) is tried again next time
                reason = {"input_id": entry["input_id"], "reason": entry["reason"], "job_key": job_key}
                self.rejected[entry["input_sha256"]] = reason

    def commit(self, every_s: float = 0.0) -> None:
        """Replace the manifest atomically (at most once per `every_s` seconds)."""
        if time.monotonic() - self.last_commit < every_s:
            return
        self._check_claim()
        blob = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        storage.write_bytes(storage.join(self.root, MANIFEST), blob, self.endpoint)
        self.last_commit = time.monotonic()

    def _run_file(self) -> str:
        return storage.join(self.root, RUN_FILE)

    def _check_claim(self) -> None:
        """Stop when a later run has claimed the folder: two writers would drop each other's entries
        and clean each other's fresh files. (Schedules should not overlap; this catches it if they do.)"""
        claim = json.loads(storage.read_bytes(self._run_file(), self.endpoint))
        if claim["token"] != self.token:
            who = f"host {claim['host']}, pid {claim['pid']}, started {claim['started']}"
            raise OutputError(f"another run ({who}) took over --output {storage.public_uri(self.root)}; "
                              "this run stops")

    def record_run(self, record: dict) -> None:
        self.manifest["runs"] = (self.manifest.get("runs", []) + [record])[-KEPT_RUNS:]
        self.commit()
        self.clean()  # Parquet shards whose every row was redone


def load_manifest(root: str, endpoint: str | None = None) -> dict:
    """The manifest of a translation output (FileNotFoundError if there is none)."""
    uri = storage.join(root, MANIFEST)
    if not storage.is_file(uri, endpoint):
        raise FileNotFoundError(f"no {MANIFEST} in {storage.public_uri(root)}: not a translation output")
    return json.loads(storage.read_bytes(uri, endpoint))


def read_parquet_outputs(root: str, endpoint: str | None = None) -> pa.Table:
    """The listed rows of a Parquet translation output (unlisted rows of old shards left out)."""
    entries = load_manifest(root, endpoint)["entries"]
    tables = []
    for shard in sorted({e["file"] for e in entries.values()}):
        fs, path = storage.arrow_filesystem(storage.join(root, shard), endpoint)
        tables.append(pq.read_table(path, filesystem=fs))
    if not tables:
        return OUTPUT_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    listed = pa.array(sorted(entries))
    return table.filter(pc.is_in(table["key"], value_set=listed))


# ============================================================================= inputs and the plan


@dataclass
class Source:
    """Where the inputs are: a Parquet dataset (has prepare_data's _manifest.json) or a folder."""

    uri: str | None  # None: CoGAN generates without inputs
    splits: tuple[str, ...] = ()  # dataset: which splits (all when empty)
    endpoint: str | None = None

    def kind(self) -> str:
        if self.uri is None:
            return "none"
        if storage.is_file(storage.join(self.uri, data.MANIFEST), self.endpoint):
            manifest = json.loads(storage.read_bytes(storage.join(self.uri, data.MANIFEST), self.endpoint))
            if manifest.get("kind") != KIND:
                return "parquet"
            if manifest.get("format") == "parquet":  # our own output: its images are in shards
                raise ValueError(f"--input {storage.public_uri(self.uri)} is a Parquet translation output; "
                                 "translate from PNG/JPEG outputs or a prepare_data.py dataset instead")
            return "folder"  # our own PNG/JPEG output: a folder of images (translating back, chaining)
        if not storage.exists(self.uri, self.endpoint) or storage.is_file(self.uri, self.endpoint):
            raise FileNotFoundError(f"--input {storage.public_uri(self.uri)} is not a folder of images or a "
                                    "dataset made by prepare_data.py (no such folder)")
        return "folder"


@dataclass
class Plan:
    tasks: dict  # id -> Task
    outputs: int  # (input, sample) pairs to translate
    counts: dict  # inputs, done (skipped), duplicates, ignored files
    shards: list[str] = field(default_factory=list)  # dataset: the shards to read
    half: str | None = None


def plan(job: Job, source: Source, done: dict, rejected: dict | None = None, pairs: int = 0) -> Plan:
    """The inputs and samples that `done` (the manifest's entries) does not list yet, leaving out
    inputs `rejected` before (by sha256)."""
    kind = source.kind()
    half, shards, ignored = None, [], []
    if kind == "none":
        inputs = [(f"pair-{i:06d}", None, None) for i in range(pairs)]
    elif kind == "folder":
        inputs, ignored = _folder_inputs(source)
    else:
        inputs, shards, half = _dataset_inputs(source, job.payload)
    unique, duplicates = _unique(inputs)
    rejected = rejected or {}
    before = [i for i in unique if i[1] in rejected]
    unique = [i for i in unique if i[1] not in rejected]
    taken = {e["name"]: key.rpartition("/")[0] for key, e in done.items()}
    names = output_names([i for i, _, _ in unique], taken, {i: s for i, s, _ in unique})
    tasks, skipped = {}, 0
    for input_id, sha, uri in unique:
        todo = [k for k in range(job.samples) if entry_key(sha or input_id, k) not in done]
        skipped += job.samples - len(todo)
        if todo:
            tasks[input_id] = Task(input_id, sha, names[input_id], todo, uri)
    counts = {"inputs": len(unique) + len(before), "done_before": skipped, "rejected_before": len(before),
              "duplicates": duplicates, "ignored": ignored}
    return Plan(tasks, sum(len(t.samples) for t in tasks.values()), counts, shards, half)


def visible_files(root: str, endpoint: str | None) -> list[str]:
    return [f for f in storage.list_files(root, endpoint) if not f.split("/")[-1].startswith(".")]


def _folder_inputs(source: Source) -> tuple[list[tuple], list[str]]:
    """(id, sha256, uri) of every image in the folder, hashed on a thread pool; other files ignored."""
    files = visible_files(source.uri, source.endpoint)
    wanted = [f for f in files if images.is_image_name(f)]
    uris = [storage.join(source.uri, f) for f in wanted]

    def digest(uri: str) -> str | None:
        try:
            return data.sha256(storage.read_bytes(uri, source.endpoint))
        except OSError:  # unreadable now: BatchTranslator reports it per item
            return None

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        shas = list(pool.map(digest, uris))
    return list(zip(wanted, shas, uris, strict=True)), [f for f in files if f not in set(wanted)]


def _dataset_inputs(source: Source, payload: ModelPayload) -> tuple[list[tuple], list[str], str | None]:
    manifest = data.read_manifest(source.uri, source.endpoint)
    domain, half = source_domain(manifest, payload.direction, payload.swap_ab, source.uri)
    splits = list(source.splits) or sorted(s for s, counts in manifest["counts"].items() if domain in counts)
    shards = []
    for split in splits:
        if domain not in data.split_counts(manifest, split):
            raise ValueError(f"split {split!r} of {storage.public_uri(source.uri)} has no domain {domain!r}")
        shards += data.shard_uris(manifest, source.uri, split, domain)
    inputs = []
    for uri in shards:
        fs, path = storage.arrow_filesystem(uri, source.endpoint)
        table = pq.read_table(path, filesystem=fs, columns=["id", "sha256"])
        ids, shas = table["id"].to_pylist(), table["sha256"].to_pylist()
        inputs += [(i, s, None) for i, s in zip(ids, shas, strict=True)]
    return inputs, shards, half


def source_domain(manifest: dict, direction: str, swap_ab: bool, uri: str = "") -> tuple[str, str | None]:
    """(stored domain, half) the model reads. Aligned rows hold a|b side by side: direction ab
    reads the left half, ba the right one, swapped for a model trained with data.swap_ab."""
    domains = manifest["domains"]
    if "ab" in domains:
        return "ab", "left" if (direction == "ab") != swap_ab else "right"
    domain = direction[0]
    if domain not in domains:
        raise ValueError(f"dataset {storage.public_uri(uri)} has domains {sorted(domains)}, none is the "
                         f"input domain {domain!r} of direction {direction!r}")
    return domain, None


def _unique(inputs: list[tuple]) -> tuple[list[tuple], int]:
    """One input per content (the first id in sorted order keeps it); unreadable ones kept."""
    seen, unique = set(), []
    for input_id, sha, uri in sorted(inputs, key=lambda i: i[0]):
        if sha is not None and sha in seen:
            continue
        seen.add(sha)
        unique.append((input_id, sha, uri))
    return unique, len(inputs) - len(unique)


def output_names(ids: list[str], taken: dict[str, str], shas: dict[str, str | None]) -> dict[str, str]:
    """id -> output path without suffix: the id without its extension ("sub/cat.jpg" -> "sub/cat");
    ids that would share a name keep their extension ("cat_jpg", "cat_png"); a name an earlier
    output of other content holds gets the input's hash ("cat-1f2e3d4c")."""
    stems = {i: os.path.splitext(i)[0] for i in ids}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    names = {}
    for i, stem in stems.items():
        name = stem if counts[stem] == 1 else stem + "_" + os.path.splitext(i)[1].lstrip(".").lower()
        identity = shas[i] or i
        if taken.get(name, identity) != identity:
            name = f"{name}-{identity[:8]}"
        names[i] = name
    return names


# ============================================================================= running


def run(job: Job, source: Source, *, pairs: int = 0, overwrite: bool = False, use_ray: bool = False,
        actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, progress: bool = True,
        command: str = "", commit_every_s: float = 1.0) -> dict:
    """Translate what the output does not hold yet; returns the run record (counts, rejections).

    The manifest is committed after each completed block (at most every `commit_every_s`)."""
    job.settings.check(job.payload.model_name, job.samples)
    started, outputs = _now(), Outputs(job.output, job.s3_endpoint)
    outputs.open(job, _header(job, source), overwrite)
    todo = plan(job, source, outputs.entries, outputs.rejected, pairs)
    job = replace(job, tasks=todo.tasks, half=todo.half)
    counts = {**todo.counts, "planned": todo.outputs, "translated": 0, "rejected": 0}
    rejected = []
    feed = _ray_batches if use_ray else _local_batches
    batches = feed(job, source, todo, actors, cpus_per_actor, gpus_per_actor) if job.tasks else []
    bar = tqdm(total=todo.outputs, unit="img", desc="translate", disable=not (progress and todo.outputs))
    with bar:
        for entries in batches:
            ok = [e for e in entries if e["status"] == "ok"]
            new = [e for e in entries if e["status"] == "rejected"]
            outputs.add(entries, job.key)
            outputs.commit(commit_every_s)
            rejected += new
            counts["translated"] += len(ok)
            counts["rejected"] = len(rejected)
            bar.update(len(ok) + sum(len(job.tasks[e["input_id"]].samples) for e in new))
            bar.set_postfix(rejected=len(rejected), refresh=False)
    record = {"started": started, "finished": _now(), "command": command, "counts": counts,
              "rejected": [{"input_id": r["input_id"], "reason": r["reason"]} for r in rejected]}
    outputs.record_run(record)
    return record


def _header(job: Job, source: Source) -> dict:
    return {"job_key": job.key, "model": {**asdict(job.payload.info), "type": job.payload.model_name,
                                          "direction": job.payload.direction, "size": job.payload.size},
            "settings": {**asdict(job.settings), "samples": job.samples},
            "input": storage.public_uri(source.uri) if source.uri else None, "format": job.settings.format}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _local_batches(job: Job, source: Source, the_plan: Plan, *_) -> Iterator[list[dict]]:
    worker = BatchTranslator(job)
    for rows in local_rows(job, source, the_plan):
        yield worker.process(rows)


def local_rows(job: Job, source: Source, the_plan: Plan) -> Iterator[list[dict]]:
    """Batches of input rows without Ray: ids (folder, CoGAN) or dataset rows with their bytes."""
    if not the_plan.shards:
        ids = sorted(job.tasks)
        for start in range(0, len(ids), job.batch_size):
            yield [{"id": i} for i in ids[start:start + job.batch_size]]
        return
    for uri in the_plan.shards:
        fs, path = storage.arrow_filesystem(uri, source.endpoint)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(job.batch_size, columns=["id", "sha256", "image"]):
                rows = [r for r in batch.to_pylist() if r["id"] in job.tasks]
                if rows:
                    yield rows


def _ray_batches(job: Job, source: Source, the_plan: Plan, actors: int, cpus: float,
                 gpus: float) -> Iterator[list[dict]]:
    """map_batches over an actor pool (one generator per actor); yields each block's entries."""
    import ray.data

    if the_plan.shards:  # data.ray_dataset reads a whole split; only the shards with work are read here
        fs, _ = storage.arrow_filesystem(source.uri, source.endpoint)
        paths = [storage.arrow_filesystem(u, source.endpoint)[1] for u in the_plan.shards]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "sha256", "image"],
                                   partitioning=None, file_extensions=None)
    else:
        ids = sorted(job.tasks)
        ds = ray.data.from_items([{"id": i} for i in ids], override_num_blocks=-(-len(ids) // job.batch_size))
    ds = ds.map_batches(BatchTranslator, fn_constructor_kwargs={"job": job}, batch_size=job.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                        num_gpus=gpus or None, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield [json.loads(e) for e in batch["entry"]]
