"""The Ray runner: the planned batches over a pool of plain Ray actors, one generator each. The only
module of the package that imports Ray, and only when it runs (a plain-torch box need not have it).

Plain actors rather than Ray Data's `map_batches` (issue 15): the profile of a 64-image run showed
the actors' start-up dominated by imports (torch, then ray.data and pandas, which a Ray Data map
worker imports and a plain actor does not), and the driver deep-copying, formatting and pickling the
generator's weights for Ray Data's constructor arguments. Here the work (weights included) is put in
the object store once, each actor gets a reference, and the driver keeps two batches in flight per
actor, so an actor never waits for its next batch. The rows are what the local runner feeds
(`runner.local_rows`): ids for a folder (the actor reads the files), rows with their bytes for a
dataset (the driver reads the shards)."""

import sys
from collections.abc import Iterable, Iterator

from pipeline.translate.job import RunOptions, Work
from pipeline.translate.worker import BatchTranslator

IN_FLIGHT = 2  # batches queued per actor: the next is there when one finishes
CPU_PIECES = 4  # a CPU actor gets a quarter batch at a time: the last actor to finish waits less


class _Actor:
    """One generator per actor, built once; torch uses the CPUs the actor reserved (Ray sets
    OMP_NUM_THREADS to them; set here too, so a fractional reservation still gets one thread)."""

    def __init__(self, work: Work, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = BatchTranslator(work)

    def ready(self) -> int:
        import torch

        return torch.get_num_threads()

    def process(self, rows: list[dict]) -> list[dict]:
        return self.worker.process(rows)


class Pool:
    """The actors, started at once; they build their generators while the caller goes on."""

    def __init__(self, work: Work, options: RunOptions):
        import ray

        remote = ray.remote(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or 0)(_Actor)
        shared = ray.put(work)  # the weights cross to the object store once, not once per actor
        self.actors = [remote.remote(shared, int(options.cpus_per_actor)) for _ in range(options.actors)]
        self.probes = [a.ready.remote() for a in self.actors]
        # a GPU wants whole batches; on CPUs a conv's cost is per image, so smaller pieces cost nothing
        # and shorten the tail (one actor still busy, the others done) to a quarter batch
        self.piece = piece_size(work.job.batch_size, bool(options.gpus_per_actor))

    def any_ready(self) -> bool:
        """Whether an actor has built its generator."""
        import ray

        return bool(ray.wait(self.probes, num_returns=1, timeout=0)[0])

    def batches(self, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        """Each list of rows (the caller cuts them to `self.piece`) through the pool (IN_FLIGHT per
        actor, the next to the first one free); yields each one's entries as it completes (in
        completion order)."""
        import ray

        pending = {}  # result ref -> actor
        free = [a for a in self.actors for _ in range(IN_FLIGHT)]
        batches = iter(batches)
        while True:
            while free:
                rows = next(batches, None)
                if rows is None:
                    break
                actor = free.pop(0)
                pending[actor.process.remote(rows)] = actor
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            free.append(pending.pop(done[0]))
            yield ray.get(done[0])


def piece_size(batch_size: int, gpu: bool) -> int:
    """Rows handed out at a time: whole batches to a GPU, a quarter batch to a CPU."""
    return batch_size if gpu else -(-batch_size // CPU_PIECES)


def ray_is_up() -> bool:
    """Whether this process is connected to Ray already (without importing Ray when it is not)."""
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


def start_ray() -> None:
    """A local Ray with this machine's CPUs (jobs/translate.py passes its own: --address, bars)."""
    import ray

    from pipeline.launch import local_ray_env

    with local_ray_env():
        ray.init(include_dashboard=False, log_to_driver=False)
