"""The two training readers side by side: LocalReader and Ray Data, on the same ingested shards.

    python -m benchmarks.readers [--datasets facades mnist2mnistm] [--cpus 2] [--repeats 3]

For each dataset (ingested once from --src-root into --data-root, reused when already there) it
reads whole training epochs with each reader in turn (interleaved, so that load from other
processes hits both alike) and prints, as medians of --repeats epochs with their spread (min-max):
- pairs/s per core: LocalReader runs in this process with one torch thread (one core); Ray Data
  is divided by the --cpus it was started with. A pair is one position of the epoch: an A|B
  sample (aligned) or one A and one B sample (unpaired).
- pairs per CPU-second: the same pairs over the CPU time of this process and everything it
  started (Ray's driver, raylet, GCS, workers). On a machine that others load, wall-time rates
  swing with their load; this one does not, and it is the cost per core either reader puts on
  the machine.
- the epoch's fixed cost: the time to the first batch less one steady batch (plan, read, sort,
  start of the execution), then the ratio Ray/Local per core against the goal (>= 0.9) and the
  fixed cost against its goal (< 1 s).
The reader settings are those of the datasets' recipes (facades: load 286, crop 256, flip;
mnist2mnistm: 32 px, no flip). Ray is started here with a fixed num_cpus and
launch.local_ray_env, as a job starts its own: workers compete with the driver on equal terms.
"""

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import psutil
import torch

from pipeline import data, launch

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SETTINGS = {  # the recipes' reader settings (jobs/recipes.py)
    "facades": dict(load_size=286, crop_size=256, flip=True),
    "weizmann_horse": dict(load_size=286, crop_size=256, flip=True),
    "mnist2mnistm": dict(load_size=32, crop_size=None, flip=False),
}
INGEST_LOAD = {"facades": 286, "weizmann_horse": 286}  # resized once at ingest, as benchmarks/ingest.py


def ingested(name: str, src_root: Path, data_root: Path) -> str:
    dst = data_root / name
    if not (dst / data.MANIFEST).exists():
        options = data.IngestOptions(load_size=INGEST_LOAD.get(name))
        data.ingest(str(src_root / name), str(dst), options, progress=False)
    return str(dst)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its descendants: the Ray reader's driver,
    raylet, GCS and workers, the local reader's one process. Other users of the machine do not
    count, so this figure holds on a loaded machine where wall time does not."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def timed_epoch(batches) -> dict:
    """Pairs, wall and CPU seconds, and the fixed cost (first batch less one median later batch) of
    one epoch."""
    start, cpu = time.perf_counter(), cpu_seconds()
    stamps, pairs = [], 0
    for batch in batches():
        pairs += len(next(iter(batch.values())))
        stamps.append(time.perf_counter())
    total, cpu = stamps[-1] - start, cpu_seconds() - cpu
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)] or [0.0]
    fixed = stamps[0] - start - statistics.median(gaps)
    return {"pairs": pairs, "seconds": total, "cpu": cpu, "fixed": fixed}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def compare(name: str, path: str, args) -> dict:
    spec = data.ReadSpec(path, "train", args.batch_size, seed=0, drop_last=True, **SETTINGS[name])
    readers = {
        "local": lambda epoch: lambda: data.LocalReader(spec, epoch=epoch),
        "ray": lambda epoch: lambda: data.ray_batches(spec, epoch=epoch, world_size=1, rank=0),
    }
    cores = {"local": 1, "ray": args.cpus}
    runs: dict[str, list] = {k: [] for k in readers}
    for repeat in range(args.repeats + 1):  # the first round warms caches and Ray's workers: not counted
        for key, make in readers.items():
            result = timed_epoch(make(repeat))
            if repeat:
                runs[key].append(result)
    rates = {k: [r["pairs"] / r["seconds"] / cores[k] for r in v] for k, v in runs.items()}
    per_cpu = {k: [r["pairs"] / r["cpu"] for r in v] for k, v in runs.items()}
    fixed = {k: [r["fixed"] for r in v] for k, v in runs.items()}
    pairs = runs["local"][0]["pairs"]
    print(f"\n{name}: {pairs} pairs per epoch, batch {args.batch_size}, {SETTINGS[name]}")
    for key in readers:
        print(f"  {key:5s} pairs/s per core {summary(rates[key])}   pairs per CPU-second "
              f"{summary(per_cpu[key])}   epoch fixed cost s {summary(fixed[key])}")
    ratio = statistics.median(rates["ray"]) / statistics.median(rates["local"])
    cpu_ratio = statistics.median(per_cpu["ray"]) / statistics.median(per_cpu["local"])
    ray_fixed = statistics.median(fixed["ray"])
    print(f"  ratio Ray/Local per core (wall) {ratio:.2f}, per CPU-second {cpu_ratio:.2f} (goal >= 0.9);"
          f" Ray fixed cost {ray_fixed:.2f} s (goal < 1 s: {'met' if ray_fixed < 1 else 'NOT met'})")
    return {"ratio": ratio, "cpu_ratio": cpu_ratio, "fixed": ray_fixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["facades", "mnist2mnistm"], choices=sorted(SETTINGS))
    p.add_argument("--src-root", type=Path, default=DEFAULT_SRC)
    p.add_argument("--data-root", type=Path, default=Path("/tmp/transmute-bench-readers"))
    p.add_argument("--cpus", type=int, default=2, help="Ray's num_cpus (the Ray reader's cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    import ray

    paths = {name: ingested(name, args.src_root, args.data_root) for name in args.datasets}
    with launch.local_ray_env():  # as a job's own local Ray
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "Starting execution" line per epoch
    try:
        print(f"{os.cpu_count()} cores, Ray num_cpus={args.cpus}, load average {os.getloadavg()}")
        for name, path in paths.items():
            compare(name, path, args)
        print(f"load average at the end {os.getloadavg()}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
