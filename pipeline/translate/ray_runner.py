"""The Ray runner: the planned work through Ray Data, one generator per actor. The only module of
the package that imports Ray, and only when it runs (a plain-torch box need not have it)."""

import json
from collections.abc import Iterator

from pipeline import storage
from pipeline.translate.job import RunOptions, Work
from pipeline.translate.planning import Plan, Source
from pipeline.translate.worker import BatchTranslator


def ray_batches(work: Work, source: Source, the_plan: Plan, options: RunOptions) -> Iterator[list[dict]]:
    """map_batches over an actor pool (one generator per actor); yields each block's entries."""
    import ray.data

    if the_plan.shards:  # data.ray_dataset reads a whole split; only the shards with work are read here
        fs, _ = storage.arrow_filesystem(source.data_path, source.endpoint)
        paths = [storage.arrow_filesystem(u, source.endpoint)[1] for u in the_plan.shards]
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "sha256", "image"],
                                   partitioning=None, file_extensions=None)
    else:
        ids = sorted(work.tasks)
        blocks = -(-len(ids) // work.job.batch_size)
        ds = ray.data.from_items([{"id": i} for i in ids], override_num_blocks=blocks)
    ds = ds.map_batches(BatchTranslator, fn_constructor_kwargs={"work": work}, batch_size=work.job.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=options.actors),
                        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None,
                        batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield [json.loads(e) for e in batch["entry"]]
