"""Complete training state <-> a checkpoint directory, loaded without unpickling code.

A checkpoint directory holds
- `nets.safetensors`   every net's parameters and buffers (rank 0);
- `train.pt`           optimizers, LR schedulers, step, epoch and data position (rank 0);
- `rank<R>.pt`         what differs per worker: RNG states (python, numpy, torch, cuda) and the
                       model's step state (image pools, counters);
- `config.json`        the RunConfig that produced it; `meta.json` step, epoch, run id;
- `digests-rank<R>.json` sha256 of every file rank R wrote, written after them.
Ray Train merges the files that every worker writes into one directory, which is why rank files
are named by rank. `verify` checks a checkpoint against every rank's digests before it is loaded
(a truncated or half-uploaded file is named, not unpickled into a traceback); `restore_newest`
falls back to the newest intact checkpoint, with a warning naming the bad file.
`.pt` files hold only tensors, numbers, strings and containers, and are read with
`torch.load(weights_only=True)`, so a checkpoint cannot run code when loaded.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.image_pool import ImagePool
from pipeline import storage

NETS, TRAIN, CONFIG, META = "nets.safetensors", "train.pt", "config.json", "meta.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or altered; the message names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"corrupt checkpoint file {path}: {reason}")
        self.path = path


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def digests_file(rank: int) -> str:
    return f"digests-rank{rank}.json"


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- model step state


def pack_state(state: dict) -> dict:
    """The model's step state (ints, floats, ImagePools) as plain values."""
    out = {}
    for key, value in state.items():
        if isinstance(value, ImagePool):
            out[key] = {"__pool__": value.state_dict()}
        elif isinstance(value, bool | int | float | str):
            out[key] = value
        else:
            raise TypeError(f"cannot checkpoint model state {key!r} of type {type(value).__name__}")
    return out


def unpack_state(packed: dict, device) -> dict:
    state = {}
    for key, value in packed.items():
        if isinstance(value, dict) and "__pool__" in value:
            pool = ImagePool()
            pool.load_state_dict(value["__pool__"], device=device)
            state[key] = pool
        else:
            state[key] = value
    return state


# ----------------------------------------------------------------------------- save / load


def net_tensors(nets) -> dict:
    """State dict as contiguous CPU copies: safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in nets.state_dict().items()}


@dataclasses.dataclass
class Parts:
    """What a checkpoint holds of a run: its nets, optimizers and LR schedulers (shared, written by
    rank 0), this rank's training state (image pools, step) and the loop's progress as a dict."""

    nets: torch.nn.Module
    optimizers: dict
    schedulers: dict
    state: dict
    progress: dict


def save(directory: str, parts: Parts, *, rank: int, config_json: str) -> str:
    """Write this rank's part of a checkpoint into `directory` (rank 0 also writes the shared
    part). Files are written to temp names and renamed, so a crash leaves no half file; the rank's
    digests go last, so a copy (Ray's upload) that stopped early lacks them or fails them."""
    os.makedirs(directory, exist_ok=True)
    _atomic(directory, rank_file(rank), lambda p: torch.save(
        {"rng": rng_state(), "state": pack_state(parts.state), "progress": parts.progress}, p))
    written = [rank_file(rank)]
    if rank == 0:
        written += [NETS, TRAIN, CONFIG]
        _atomic(directory, NETS, lambda p: save_file(net_tensors(parts.nets), p))
        _atomic(directory, TRAIN, lambda p: torch.save({
            "optimizers": {k: o.state_dict() for k, o in parts.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in parts.schedulers.items()},
            "progress": parts.progress,
        }, p))
        storage.write_bytes(os.path.join(directory, CONFIG), config_json.encode())
    digests = {name: file_sha256(os.path.join(directory, name)) for name in written}
    storage.write_bytes(os.path.join(directory, digests_file(rank)), json.dumps(digests, indent=1).encode())
    return directory


def write_meta(directory: str, meta: dict) -> None:
    """Written last, by rank 0, once every rank has saved: its presence marks a complete checkpoint.
    `digests: true` says that every rank of `world_size` wrote its digests (`verify` requires them)."""
    meta = {**meta, "digests": True}
    storage.write_bytes(os.path.join(directory, META), json.dumps(meta, indent=2).encode())


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: str, files: tuple[str, ...] | None = None) -> None:
    """Raise CorruptCheckpoint naming the first file (of `files`, default all) that is missing or
    differs from its rank's digests. Checkpoints written before digests existed (no `digests` in
    meta.json) pass; their files are still named if they fail to load."""
    path = os.path.join(directory, META)
    meta = _read(path, lambda p: json.loads(storage.read_bytes(p))) if os.path.exists(path) else {}
    if not meta.get("digests"):
        return
    for rank in range(int(meta.get("world_size", 1))):
        listing = os.path.join(directory, digests_file(rank))
        try:
            with open(listing) as f:
                digests = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(listing, f"cannot read rank {rank}'s digests ({e})") from None
        for name, expected in digests.items():
            if files is not None and name not in files:
                continue
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CorruptCheckpoint(path, "missing")
            if file_sha256(path) != expected:
                reason = f"sha256 differs from {digests_file(rank)} (truncated or altered)"
                raise CorruptCheckpoint(path, reason)


def _read(path: str, reader):
    """`reader(path)`, with any failure to read or parse the file named as a CorruptCheckpoint."""
    try:
        return reader(path)
    except (MemoryError, torch.OutOfMemoryError):  # the machine's trouble, not the file's
        raise
    except Exception as e:  # safetensors, zip and unpickler errors share no base class
        raise CorruptCheckpoint(path, f"{type(e).__name__}: {e}") from None


def _atomic(directory: str, name: str, write) -> None:
    with storage.replacing(os.path.join(directory, name)) as temp:
        write(temp)


def load_nets(directory: str, nets, device="cpu") -> None:
    """Load `nets.safetensors` into `nets`; every key must match (a config mismatch says so)."""
    tensors = _read(os.path.join(directory, NETS), lambda p: load_file(p, device=str(device)))
    missing, unexpected = nets.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not fit these nets: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was it written with another model config? (see its {CONFIG})"
        )


def load(directory: str, *, rank: int, nets, optimizers: dict, schedulers: dict, device="cpu") -> dict:
    """Restore everything `save` wrote; returns {"progress", "state", "rank_restored"}.

    A rank without its own file (the run restarted with more workers) keeps fresh RNG seeds and
    empty pools and says so in the result, rather than copying another rank's randomness.
    The checkpoint is verified first (CorruptCheckpoint names a bad file)."""
    verify(directory)
    load_nets(directory, nets, device)
    train = _read(os.path.join(directory, TRAIN),
                  lambda p: torch.load(p, map_location=device, weights_only=True))
    for name, opt in optimizers.items():
        opt.load_state_dict(train["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(train["schedulers"][name])
    path = os.path.join(directory, rank_file(rank))
    if not os.path.exists(path):
        return {"progress": train["progress"], "state": {}, "rank_restored": False}
    mine = _read(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    set_rng_state(mine["rng"])
    state = unpack_state(mine["state"], device)
    return {"progress": train["progress"], "state": state, "rank_restored": True}


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def read_config_json(directory: str) -> str:
    with open(os.path.join(directory, CONFIG)) as f:
        return f.read()


# ----------------------------------------------------------------------------- local checkpoint folders


def local_checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"checkpoint_{step:08d}")


def complete(names: list[str]) -> list[str]:
    """Checkpoint folder names, newest first, among the relative file paths of a run folder
    (complete = its meta.json, written last, is there)."""
    done = {p.split("/")[0] for p in names
            if p.startswith("checkpoint_") and p.endswith("/" + META) and p.count("/") == 1}
    return sorted(done, reverse=True)


def warn_skipped(error: CorruptCheckpoint) -> None:
    print(f"warning: skipping a checkpoint: {error}; trying an older one", file=sys.stderr, flush=True)


def latest_local(root: str) -> str | None:
    """The newest complete checkpoint under `root` that verifies, None when there is none; a
    corrupt newer one is skipped with a warning naming its bad file, and when every one is
    corrupt, the newest one's error is raised."""

    def verified(name: str) -> str:
        verify(os.path.join(root, name))
        return os.path.join(root, name)

    return first_intact(complete(storage.list_files(root)) if os.path.isdir(root) else [], verified)


def first_intact(candidates, attempt):
    """attempt(candidate) for the first candidate that is not corrupt (newest first); each corrupt
    one is skipped with a warning naming its bad file. None when there are no candidates; when all
    are corrupt, the first one's error is raised (starting over would redo finished work)."""
    first_error = None
    for candidate in candidates:
        try:
            return attempt(candidate)
        except CorruptCheckpoint as e:
            warn_skipped(e)
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return None


def latest_meta(root: str, endpoint: str | None = None) -> dict | None:
    """meta.json of the newest complete checkpoint under a run folder, local or s3:// (where Ray
    Train writes the run's checkpoints) whose meta.json parses; None when there is none."""
    for name in complete(storage.list_files(root, endpoint)):
        try:
            return json.loads(storage.read_bytes(storage.join(root, name, META), endpoint))
        except ValueError:
            print(f"warning: skipping {storage.join(root, name, META)}: not JSON", file=sys.stderr)
    return None


@contextlib.contextmanager
def local_copy(uri: str, endpoint: str | None = None):
    """A local folder holding the checkpoint at `uri`: itself when local, else a temporary download."""
    if not storage.is_s3(uri):
        yield uri
        return
    folder = staging_dir("transmute-restore-")
    try:
        for rel in storage.list_files(uri, endpoint):
            blob = storage.read_bytes(storage.join(uri, rel), endpoint)
            storage.write_bytes(os.path.join(folder, rel), blob)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore_newest(root: str, load, endpoint: str | None = None, recorded=None):
    """`load(directory)` on the newest intact checkpoint of the run folder `root` (local or s3://),
    or None when it holds none. `recorded`: the checkpoint Ray Train or Tune hands back (a
    ray.train.Checkpoint; None when it has none); it competes by its folder name (checkpoint_<step>)
    with those on storage, so a checkpoint written but not yet registered when a worker died is
    resumed from, not redone. A corrupt one is skipped with a warning naming its bad file; if every
    one is corrupt, the newest one's error is raised (starting over would redo finished work)."""
    names = complete(storage.list_files(root, endpoint))
    recorded_name = os.path.basename(recorded.path.rstrip("/")) if recorded is not None else None
    candidates = [(name, None) for name in names]
    if recorded is not None and recorded_name not in names:
        candidates = sorted(candidates + [(recorded_name, recorded)], key=lambda c: c[0], reverse=True)

    def loaded(candidate):
        name, reported = candidate
        if reported is not None:
            with reported.as_directory() as directory:
                return load(directory)
        with local_copy(storage.join(root, name), endpoint) as directory:
            return load(directory)

    return first_intact(candidates, loaded)


def prune_local(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("checkpoint_"))
    for name in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def staging_dir(prefix="transmute-ckpt-") -> str:
    return tempfile.mkdtemp(prefix=prefix)


# ----------------------------------------------------------------------------- its generator


def read_meta_if_any(directory: str) -> dict:
    return read_meta(directory) if os.path.exists(os.path.join(directory, META)) else {}


def export_generator(directory: str, direction: str | None = None, folder: str | None = None):
    """The generator serving `direction` (default the model's first) as a GeneratorArtifact with
    the training image size and swap_ab from the checkpoint's config.json, written to `folder` when
    given; returns (artifact, the run's name)."""
    from models import MODELS
    from pipeline.generator_artifact import GeneratorArtifact
    from pipeline.run_config import from_json, image_size

    verify(directory, (NETS, CONFIG))  # what a generator needs: a bad train.pt does not stop it
    cfg = from_json(read_config_json(directory), source=os.path.join(directory, CONFIG))
    spec = MODELS[cfg.model_name]
    direction = direction or spec.directions[0]
    if direction not in spec.directions:
        raise ValueError(f"checkpoint {directory} ({cfg.model_name}) has directions {spec.directions}, "
                         f"not {direction!r}")
    nets = spec.build_nets(cfg.model)
    load_nets(directory, nets)
    net = nets[spec.generator_for[direction]]
    artifact = GeneratorArtifact.from_net(cfg.model_name, cfg.model, direction, net, image_size(cfg),
                                          cfg.data.swap_ab)
    if folder:
        artifact.export(folder)
    return artifact, cfg.tracking.run_name
