"""The training data of one rank, in order: batches per epoch, the batches of one epoch from a
saved position (resume), the endless stream of them across epochs with the next epoch read ahead,
and a batch moved to the device. The order depends only on the seed, the epoch and the rank, so a
resumed run reads exactly what an uninterrupted one would (see pipeline.data's epoch order).
"""

import dataclasses
import threading

import torch


def batches_per_epoch(cfg, world: int) -> int:
    from pipeline.data import read_manifest, split_counts

    counts = split_counts(read_manifest(cfg.data.path, cfg.storage.endpoint or None), cfg.data.train_split)
    n = max(counts.values()) // world // cfg.train.batch_size
    if n < 1:
        raise ValueError(f"{cfg.data.path}: {max(counts.values())} training samples cannot fill one batch of "
                         f"{cfg.train.batch_size} on each of {world} workers; lower train.batch_size")
    return n


def reader_used(cfg) -> tuple[str, str]:
    """("local" | "ray", why) for the run's training split: data.reader, "auto" resolved by size."""
    from pipeline.data import choose_reader, read_manifest

    auto = cfg.data.reader == "auto"  # only the size needs the manifest
    manifest = read_manifest(cfg.data.path, cfg.storage.endpoint or None) if auto else None
    return choose_reader(cfg.data.reader, manifest, cfg.data.train_split)


def epoch_batches(cfg, world: int, rank: int, epoch: int, skip_batches: int):
    """This rank's batches of one epoch, starting after `skip_batches` (resume)."""
    from pipeline.data import ReadSpec

    spec = ReadSpec.from_config(cfg)
    where = dict(epoch=epoch, world_size=world, rank=rank, skip=skip_batches * spec.batch_size)
    if reader_used(cfg)[0] == "ray":
        from pipeline.data import ray_batches

        return ray_batches(spec, **where)
    from pipeline.data import LocalReader

    return iter(LocalReader(spec, **where))


def batch_stream(cfg, world: int, rank: int, progress, per_step: int = 1):
    """(epoch, index in epoch, batch) forever, from the saved data position on; a step takes
    `per_step` batches. With the Ray Data reader the next epoch starts reading halfway through this
    one: a fresh Ray Data execution takes seconds to yield its first batch, which would otherwise
    stall every epoch boundary."""
    used = reader_used(cfg)[0]  # auto resolved once (it reads the manifest), not once per epoch
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, reader=used))
    per_epoch, read_ahead = batches_per_epoch(cfg, world), used == "ray"
    epoch, skip = progress.epoch, progress.batch
    consumed, needed = progress.step * per_step, cfg.train.steps * per_step  # batches
    if skip >= per_epoch:
        epoch, skip = epoch + 1, 0
    current = epoch_batches(cfg, world, rank, epoch, skip)
    while True:
        upcoming = None
        for index, batch in enumerate(current, start=skip):
            needs_next = consumed + per_epoch - index < needed  # batches left after this epoch
            if upcoming is None and read_ahead and index >= per_epoch // 2 and needs_next:
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
    """The batch on `device` (a and b swapped when data.swap_ab). To a GPU it goes through pinned
    host memory: only a copy from pinned memory is asynchronous, so the step's kernels queue behind
    it while the host reads the next batch; a copy from pageable memory makes the host wait."""
    keys = {"a": "b", "b": "a", "label_a": "label_b", "label_b": "label_a"} if cfg.data.swap_ab else {}
    pin = torch.device(device).type == "cuda"
    out = {}
    for key, value in batch.items():
        if key in ("a", "b", "label_a", "label_b"):
            if pin and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            out[keys.get(key, key)] = value
    return out
