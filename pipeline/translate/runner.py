"""Running a job: the driver (`run`: resolve, open the folder, plan, feed, commit the output index
after each block), the local runner, which feeds batches in this process without Ray, and the choice
between them (`RunOptions.mode`: "local", "ray", or "auto": Ray only above the crossover)."""

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import storage
from pipeline.translate import ray_runner
from pipeline.translate.job import Job, RunOptions, Work
from pipeline.translate.outputs import Outputs, now, unreadable_key
from pipeline.translate.planning import Plan, Source, plan, resolve
from pipeline.translate.worker import BatchTranslator

# Fixed costs of the Ray path, measured with benchmarks/translate.py (the default CycleGAN G at 128 px,
# 2-core machine; load_factor() scales them on a loaded one, and the per-image cost with them):
RAY_START_S = 6.0  # ray.init of a local Ray (raylet, GCS, first workers): 4.3 s idle, 9.2 s at load 2.8
# an actor's process (importing torch and the package, building the generator) and the uneven tail:
# 0.5-1.4 s idle, about 10 s at load 6; 5 s leans towards in-process near the crossover, where the
# two differ little per core (at 256 images: forced Ray 1.03-1.10, auto 0.97-1.13 of in-process)
ACTOR_START_S = 5.0


def run(job: Job, source: Source, options: RunOptions | None = None) -> dict:
    """Translate what the output does not hold yet; returns the run record (counts, rejections).

    The manifest is committed after each completed block (at most every `options.commit_every_s`)."""
    options = options or RunOptions()
    job.settings.check(job.generator.model_name, job.samples)
    started, outputs = now(), Outputs(job.output, job.endpoint)
    work = resolve(job, source)  # complete before the folder is opened: its key filters the output index
    outputs.open(work, _header(work, source), options.overwrite)
    todo = plan(work, source, outputs.entries, outputs.rejected, options.pairs)
    for input_id in todo.tasks:  # planned again: readable now, so its record by path is stale
        outputs.rejected.pop(unreadable_key(input_id), None)
    work = replace(work, tasks=todo.tasks)  # tasks are no part of the key
    counts = {**todo.counts, "planned": todo.outputs, "translated": 0, "rejected": 0}
    rejected = []
    said = {"ran": options.ran}  # the feed says where it ran, once it has chosen
    batches = _feed(work, source, todo, options, said) if work.tasks else []
    shown = options.progress and todo.outputs
    bar = tqdm(total=todo.outputs, unit="img", desc="translate", disable=not shown)
    with bar:
        for entries in batches:
            ok = [e for e in entries if e["status"] == "ok"]
            new = [e for e in entries if e["status"] == "rejected"]
            outputs.add(entries, work.key)
            outputs.commit(options.commit_every_s)
            rejected += new
            counts["translated"] += len(ok)
            counts["rejected"] = len(rejected)
            bar.update(len(ok) + sum(len(work.tasks[e["input_id"]].samples) for e in new))
            bar.set_postfix(rejected=len(rejected), refresh=False)
    record = {"started": started, "finished": now(), "command": options.command, "counts": counts,
              "ran": said["ran"] or ("in-process" if options.mode == "local" else "on Ray"),
              "input_half": {"half": work.half, "why": work.half_reason},
              "rejected": [{"input_id": r["input_id"], "reason": r["reason"]} for r in rejected]}
    outputs.record_run(record)
    return record


def _header(work: Work, source: Source) -> dict:
    job = work.job
    return {"job_key": work.key, "model": {**asdict(job.info), "type": job.generator.model_name,
                                          "direction": job.generator.direction, "size": job.generator.size},
            "settings": {**asdict(job.settings), "samples": job.samples},
            "input": storage.public_uri(source.data_path) if source.data_path else None,
            "format": job.settings.format}


def _feed(work: Work, source: Source, the_plan: Plan, options: RunOptions, said: dict) -> Iterator[list]:
    """Each batch's entries, from this process or the actors; `said["ran"]` tells which and why."""
    rows = local_rows(work, source, the_plan)
    if options.mode == "ray":
        said["ran"] = said["ran"] or f"on Ray: {_actors(options)} (--ray)"
        yield from _on_ray(work, rows, options, None)
        return
    worker = BatchTranslator(work)
    if options.mode == "local":
        said["ran"] = said["ran"] or "in-process: --no-ray"
        yield from (worker.process(r) for r in rows)
        return
    # auto: a first piece here, timed; the rest here or on Ray, whichever the count says is faster.
    # Pieces (a quarter batch on a CPU) so that the choice, and the hand-over to actors that have
    # started, wait for little work here
    rows = pieces(rows, ray_runner.piece_size(work.job.batch_size, work.job.device != "cpu"))
    first = next(rows, [])
    start = time.perf_counter()
    entries = worker.process(first)
    per_image = (time.perf_counter() - start) / max(1, _outputs(work, entries))
    yield entries
    on_ray, why = choose(the_plan.outputs, per_image, options)
    said["ran"] = f"on Ray: {_actors(options)} (auto, {why})" if on_ray else f"in-process: auto, {why}"
    if on_ray:
        yield from _on_ray(work, rows, options, worker)
    else:
        yield from (worker.process(r) for r in rows)


def _on_ray(work: Work, rows: Iterator[list[dict]], options: RunOptions, local) -> Iterator[list[dict]]:
    """The batches on the actor pool; while no actor is ready yet, `local` (a worker in this process,
    or None) translates the next piece here, so the actors' start-up is not idle time."""
    if not ray_runner.ray_is_up():
        (options.start_ray or ray_runner.start_ray)()
    pool = ray_runner.Pool(work, options)
    rows = pieces(rows, pool.piece)
    if local is not None:
        while not pool.any_ready():
            piece = next(rows, None)
            if piece is None:
                return
            yield local.process(piece)
    yield from pool.batches(rows)


def pieces(batches: Iterator[list], size: int) -> Iterator[list]:
    """The same rows in lists of at most `size`."""
    for batch in batches:
        for start in range(0, len(batch), size):
            yield batch[start:start + size]


def choose(outputs: int, per_image_s: float, options: RunOptions) -> tuple[bool, str]:
    """auto: Ray (True) when it should finish sooner than this process, and the reason in words."""
    at = crossover(per_image_s, options, ray_runner.ray_is_up())
    if math.isinf(at):
        return False, f"Ray is no faster with {_actors(options)} on {os.cpu_count()} cores (--ray forces it)"
    if outputs < at:
        return False, f"{outputs} images below the crossover of {math.ceil(at)} (--ray forces Ray)"
    return True, f"{outputs} images above the crossover of {math.ceil(at)}; --no-ray runs in this process"


def crossover(per_image_s: float, options: RunOptions, ray_up: bool) -> float:
    """The number of images above which Ray finishes sooner: n·t > start + n·t/speedup, where t is the
    per-image time measured here, start the fixed cost of Ray (its start, unless up, and the actors'
    start-up) and speedup the actors' threads over this process's (this machine's cores at most).
    The fixed costs are unloaded figures; on a machine busy with other work they are scaled by the
    load average per core, as the measured t already is (imports and convolutions both wait for a core)."""
    cores = os.cpu_count() or 1
    threads = min(options.actors * max(1, int(options.cpus_per_actor)), cores)
    speedup = threads / torch.get_num_threads() if not options.gpus_per_actor else options.actors
    if speedup <= 1:
        return math.inf
    start = (ACTOR_START_S + (0.0 if ray_up else RAY_START_S)) * load_factor()
    return start / (max(per_image_s, 1e-9) * (1 - 1 / speedup))


def load_factor() -> float:
    """How much slower than unloaded a CPU-bound task runs here now: runnable tasks per core, >= 1."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def _outputs(work: Work, entries: list[dict]) -> int:
    return sum(1 if e["status"] == "ok" else len(work.tasks[e["input_id"]].samples) for e in entries)


def _actors(options: RunOptions) -> str:
    return f"{options.actors} actor{'s' if options.actors > 1 else ''}"


def local_rows(work: Work, source: Source, the_plan: Plan) -> Iterator[list[dict]]:
    """Batches of input rows without Ray: ids (folder, CoGAN) or dataset rows with their bytes."""
    batch_size = work.job.batch_size
    if not the_plan.shards:
        ids = sorted(work.tasks)
        for start in range(0, len(ids), batch_size):
            yield [{"id": i} for i in ids[start:start + batch_size]]
        return
    for uri in the_plan.shards:
        fs, path = storage.arrow_filesystem(uri, source.endpoint)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size, columns=["id", "sha256", "image"]):
                rows = [r for r in batch.to_pylist() if r["id"] in work.tasks]
                if rows:
                    yield rows
