"""Running a job: the driver (`run`: resolve, open the folder, plan, feed, commit the output index
after each block) and the local runner, which feeds batches in this process without Ray."""

from collections.abc import Iterator
from dataclasses import asdict, replace

import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import storage
from pipeline.translate.job import Job, RunOptions, Work
from pipeline.translate.outputs import Outputs, now, unreadable_key
from pipeline.translate.planning import Plan, Source, plan, resolve
from pipeline.translate.ray_runner import ray_batches
from pipeline.translate.worker import BatchTranslator


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
    feed = ray_batches if options.use_ray else _local_batches
    batches = feed(work, source, todo, options) if work.tasks else []
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
              "ran": options.ran or ("on Ray" if options.use_ray else "in-process"),
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


def _local_batches(work: Work, source: Source, the_plan: Plan, _: RunOptions) -> Iterator[list[dict]]:
    worker = BatchTranslator(work)
    for rows in local_rows(work, source, the_plan):
        yield worker.process(rows)


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
