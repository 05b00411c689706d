"""Ray Train's cost against torchrun: the same loop, the same gradient averaging, side by side.

    python -m benchmarks.train_overhead --sample --size 64 --steps 4 --warmup 1 --repeats 3
    python -m benchmarks.train_overhead --threads 2 --only plain,ray1          # one pair

Modes (each a subprocess, interleaved per repeat so load drift hits all alike):
- `plain`     pipeline.loop.run_plain in one process, --threads torch threads.
- `torchrun1` / `torchrun2`  the same through `torchrun --nproc_per_node 1|2` (gloo; each process gets
              --threads ÷ N threads; the loop averages gradients with pipeline.distributed).
- `ray1` / `ray2`  pipeline.loop.ray_trainer(cfg).fit() with 1|2 workers of --threads ÷ N CPUs each,
              the same averaging, the same in-process reader (LocalReader: Ray Data's cost is
              benchmarks/ingest.py's subject, not this one's).
images/s is the loop's own perf/images_per_s on rank 0 (global images: batch × workers) over the steps
after the warm-up, as benchmarks.train_step counts it, and rank 0's CPU ms per step (its process time:
on a shared box it moves less than wall time). Printed: one JSON line per run, a summary
line with medians, spreads (min–max) and ray_overhead_N = 1 − rayN ÷ torchrunN (goal ≤ 0.10),
then a table. Ray is started as a job starts its own (launch.local_ray_env: workers at niceness 0,
no preemption watcher, unless the environment says otherwise; see the README's Ray Train section).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import train_step as ts

MODES = ("plain", "torchrun1", "ray1", "torchrun2", "ray2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="per worker")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all, split")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--sample", action="store_true", help="loop on tests/assets/facades_small")
    p.add_argument("--src", type=Path, help="image folder to ingest (default facades)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per worker")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.src = args.src or (ts.SAMPLE if args.sample else ts.FACADES)
    args.amp = args.channels_last = args.device == "cuda"  # as training does: GPU only
    args.compile = False
    return args


def workers(mode: str) -> int:
    return 1 if mode == "plain" else int(mode.removeprefix("torchrun").removeprefix("ray"))


class RankZero:
    """Tracker factory: rank 0 records perf rows to `path` (ts.PerfRecorder), other ranks record nothing."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, cfg, rank: int):
        return ts.PerfRecorder(self.path if rank == 0 else None)


def child_config(args, mode: str):
    n = workers(mode)
    args.threads = max(1, args.threads // n)  # per worker; loop_config makes it cpus_per_worker
    cfg = ts.loop_config(args, mode, "local")
    cfg.scaling.num_workers = n
    # a fresh name per run (else a repeat resumes the last one's final checkpoint and trains nothing);
    # torchrun's ranks share its run id
    cfg.tracking.run_name = f"bench-{mode}-{os.environ.get('TORCHELASTIC_RUN_ID') or os.getpid()}"
    return cfg


def run_child(args) -> dict:
    """One measurement, in this process (plain, a torchrun rank, or the Ray driver)."""
    from pipeline import launch, loop

    cfg = child_config(args, args.child)
    path = os.path.join(args.workdir, f"{args.child}-{os.getppid()}.json")
    start = time.perf_counter()
    if args.child.startswith("ray"):
        import ray

        cpus = math.ceil(cfg.scaling.cpus_per_worker * cfg.scaling.num_workers) + 1
        with launch.local_ray_env():  # as a job's own local Ray
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            result = loop.ray_trainer(cfg, make_tracker=RankZero(path)).fit()
        finally:
            ray.shutdown()
        if result.error:
            raise result.error
    else:
        loop.run_plain(cfg, make_tracker=RankZero(path))
        if int(os.environ.get("RANK", "0")):
            return {}
    recorded = json.loads(Path(path).read_text())
    out = ts.loop_figures(recorded["rows"], args.warmup, args.batch * cfg.scaling.num_workers)
    return {**out, "threads_per_worker": recorded["threads"], "workers": cfg.scaling.num_workers,
            "wall_s": round(time.perf_counter() - start, 1)}


def child_argv(args, mode: str, data: str, workdir: str) -> list[str]:
    flags = ["--child", mode, "--size", str(args.size), "--batch", str(args.batch),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
             "--data", data, "--workdir", workdir, "--device", args.device]
    me = ["-m", "benchmarks.train_overhead"]
    if mode.startswith("torchrun"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={workers(mode)}", *me, *flags]
    return [sys.executable, *me, *flags]


def measure(args, mode: str, data: str, workdir: str) -> dict:
    env = {"OMP_NUM_THREADS": str(max(1, args.threads // workers(mode))), "PYTHONWARNINGS": "ignore"}
    env = {**os.environ, **env}
    start, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(child_argv(args, mode, data, workdir), capture_output=True, text=True, env=env,
                          cwd=ts.REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and "images_per_s" in line]
    if proc.returncode or not lines:
        out = {"error": f"exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-4:])}
    else:
        out = json.loads(lines[-1])
    return {**out, "mode": mode, "process_s": round(time.perf_counter() - start, 1),
            "load1": [round(load, 2), round(os.getloadavg()[0], 2)]}


def spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}


def cpu_spread(results: list[dict], mode: str) -> dict:
    """Rank 0's process CPU ms per step (in a Ray run: the worker's, where the loop runs)."""
    return spread([r["cpu_ms_per_step"] for r in results if r["mode"] == mode and r.get("cpu_ms_per_step")])


def summarize(args, results: list[dict], modes: list[str]) -> dict:
    rate = {(r["repeat"], r["mode"]): r.get("images_per_s") for r in results}
    ips = {m: spread([r["images_per_s"] for r in results if r["mode"] == m and "images_per_s" in r])
           for m in modes}
    summary = {"mode": "summary", "size": args.size, "batch_per_worker": args.batch, "steps": args.steps,
               "repeats": args.repeats, "threads": args.threads, "images_per_s": ips,
               "cpu_ms_per_step": {m: cpu_spread(results, m) for m in modes}}
    for n in (1, 2):
        each = [round(1 - rate[k, f"ray{n}"] / rate[k, f"torchrun{n}"], 4) for k in range(args.repeats)
                if rate.get((k, f"ray{n}")) and rate.get((k, f"torchrun{n}"))]
        summary[f"ray_overhead_{n}"] = spread(each)  # paired: the two ran back to back
        summary[f"goal_met_{n}"] = each and statistics.median(each) <= 0.10 or None
    return summary


def print_table(summary: dict) -> None:
    print(f"\nimages/s, median [min-max] of {summary['repeats']} runs, {summary['threads']} threads in all")
    for mode, s in summary["images_per_s"].items():
        if s["median"] is not None:
            cpu = summary["cpu_ms_per_step"][mode]["median"]
            print(f"{mode:<10}{s['median']:>10.4g}  [{s['min']:.4g}-{s['max']:.4g}]  CPU ms/step {cpu}")
    for n in (1, 2):
        o = summary[f"ray_overhead_{n}"]
        if o["median"] is not None:
            print(f"Ray Train overhead, {n} worker(s) vs torchrun: {o['median']:+.3f} "
                  f"[{o['min']:+.3f} to {o['max']:+.3f}] (goal <= 0.10)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        out = run_child(args)
        if out:
            print(json.dumps(out), flush=True)
        return
    modes = [m.strip() for m in args.only.split(",") if m.strip()] or list(MODES)
    results = interleaved(args, "train_overhead_", modes, lambda m, data, work: measure(args, m, data, work))
    summary = ts.emit(summarize(args, results, modes))
    print_table(summary)


def interleaved(args, prefix: str, keys, measure) -> list[dict]:
    """measure(key, data, workdir) for every key once per repeat, the keys taking turns (so that load
    drift hits all alike), on data ingested once into a temp dir; each result printed as it comes."""
    results = []
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        data, why = ts.ingest_once(args, workdir)
        if not data:
            raise SystemExit(why)
        for repeat in range(args.repeats):
            for key in keys:
                results.append(ts.emit({**measure(key, data, workdir), "repeat": repeat}))
    return results


if __name__ == "__main__":
    main()
