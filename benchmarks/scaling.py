"""Ray Train scaling: images/s for 1, 2 and 4 workers on the same global batch, and what each added
worker brings.

    python -m benchmarks.scaling --sample --size 64 --global-batch 4 --steps 4 --repeats 3    # CPU
    python -m benchmarks.scaling --device cuda --size 256 --global-batch 8 --workers 1,2,4,8  # N GPUs

Each run is benchmarks.train_overhead's `rayN` child: the loop through pipeline.loop.ray_trainer with N
workers, global batch ÷ N per worker (gradients averaged, so every N trains the same model), the
in-process reader; on CPU each worker gets --threads CPUs (default 1), on CUDA one GPU each.
Printed per N: median images/s [min-max], speed-up over 1 worker, efficiency = speed-up ÷ N, and the
gain per added worker = (images/s(N) − images/s(previous N)) ÷ (added workers × images/s(1)).
Where workers × threads exceed the cores (the 2-core CPU box at 4 workers; at 2 workers already, when
anything else runs) this measures the overhead of more processes on the same cores, not a speed-up:
the extra Ray actors, the gradient all-reduce and smaller per-worker convolutions.
"""

import argparse
import os
import statistics

from benchmarks import train_overhead as to
from benchmarks import train_step as ts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts; the first is the base")
    p.add_argument("--global-batch", type=int, default=4, help="images per step over all workers")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) of each worker")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sample", action="store_true", help="tests/assets/facades_small")
    args = p.parse_args(argv)
    args.counts = [int(n) for n in args.workers.split(",")]
    bad = [n for n in args.counts if args.global_batch % n]
    if bad:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {bad} workers")
    args.src = ts.SAMPLE if args.sample else ts.FACADES
    return args


def run_one(args, n: int, data: str, workdir: str) -> dict:
    # train_overhead splits its --threads over the workers: hand it n × the per-worker share
    child = argparse.Namespace(**{**vars(args), "batch": args.global_batch // n, "threads": args.threads * n})
    return to.measure(child, f"ray{n}", data, workdir)


def summarize(args, results: list[dict]) -> list[dict]:
    rates = {n: [r["images_per_s"] for r in results if r["workers_asked"] == n and "images_per_s" in r]
             for n in args.counts}
    median = {n: statistics.median(v) if v else None for n, v in rates.items()}
    base, rows, previous = median[args.counts[0]], [], None
    for n in args.counts:
        m = median[n]
        row = {"workers": n, "images_per_s": to.spread(rates[n])}
        if m and base:
            speedup = m / base * args.counts[0]  # the base counts as its own number of workers
            row.update(speedup=round(speedup, 3), efficiency=round(speedup / n, 3))
            if previous is not None and median[previous]:
                added = (m - median[previous]) / ((n - previous) * base / args.counts[0])
                row["gain_per_added_worker"] = round(added, 3)
        rows.append(row)
        previous = n
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    results = to.interleaved(args, "scaling_", args.counts,
                             lambda n, data, workdir: {**run_one(args, n, data, workdir), "workers_asked": n})
    rows = summarize(args, results)
    ts.emit({"mode": "summary", "device": args.device, "global_batch": args.global_batch, "size": args.size,
             "threads": args.threads, "cores": os.cpu_count(), "rows": rows})
    print(f"\nRay Train, global batch {args.global_batch}, {args.size} px, {args.device}, "
          f"{os.cpu_count()} cores; median [min-max] of {args.repeats}")
    for row in rows:
        s = row["images_per_s"]
        if s["median"] is None:
            print(f"{row['workers']:>3} workers  failed")
            continue
        gain = row.get("gain_per_added_worker")
        print(f"{row['workers']:>3} workers {s['median']:>9.4g} [{s['min']:.4g}-{s['max']:.4g}] images/s  "
              f"speed-up {row.get('speedup', 0):.2f}  efficiency {row.get('efficiency', 0):.2f}"
              + (f"  per added worker {gain:+.2f}" if gain is not None else ""))
    if args.device == "cpu" and max(args.counts) * args.threads > (os.cpu_count() or 1):
        print(f"note: {os.cpu_count()} cores for up to {max(args.counts)} workers: this shows the overhead "
              "of splitting the same cores, not a speed-up")


if __name__ == "__main__":
    main()
