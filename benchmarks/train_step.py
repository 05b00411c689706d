"""CycleGAN training throughput: our step and our loop beside the reference step, in one run.

    # CPU (here: 2 cores; 128² by default, where one step takes 3 s quiet and far more when
    # others load the box, hence the few steps; --repeats 3 for medians of 3):
    python -m benchmarks.train_step --device cpu
    python -m benchmarks.train_step --device cpu --size 256 --steps 5 --warmup 2 --skip-ray
    # GPU (plain torch is enough with --skip-ray; plain needs pyarrow and the facades folder):
    python -m benchmarks.train_step --device cuda --amp --channels-last --compile --skip-ray
    python -m benchmarks.train_step --device cuda --amp --channels-last --compile --only ref,ours

Every measurement runs in its own subprocess (this script with --child, or the reference script)
with the same environment, torch thread count (OMP_NUM_THREADS = --threads) and settings: batch,
size, warm-up and timed steps, bf16 autocast (--amp), channels-last (--channels-last),
torch.compile of each net (--compile). One image = one A and one B sample, as the reference counts.
--repeats runs every selected mode once per round, interleaved. Printed: one JSON line per
measurement (with the 1-min load average before and after it), a summary JSON line (medians over
the rounds, ratios), then a table.

- `ref`   ../shared/bench/ref_cyclegan_step.py (or --ref): the peer's step on random tanh inputs;
          its JSON line is passed through (images/s recomputed from step_ms: it rounds to 0.01).
- `ours`  models.MODELS["cyclegan"].train_step with the same architecture (ResNet-9 generators
          ngf 64, 70×70 PatchGAN ndf 64, instance norm, LSGAN, identity 0.5, pool 50, Adam 2e-4),
          random tanh inputs, timed as the reference: one FLOP-counting step unless --compile (its
          gflop_per_step must equal the reference's), the warm-up, then the timed steps between
          two synchronisations. ours_vs_ref = ours ÷ ref images/s (> 1: ours is faster).
- `plain` pipeline.loop.run_plain: the whole loop, no Ray, on facades ingested once into a temp dir
          (resized to size + size/8, random crop `size`; --sample: tests/assets/facades_small),
          LocalReader, evaluation (4 images) and checkpoint at the end only, no MLflow. images/s is
          the loop's own perf/images_per_s (Meter: images ÷ time from fetching the batch to the end
          of the step, data wait included, evaluation and checkpoints not), captured per step by a
          stand-in tracker, over the steps after the warm-up. plain_vs_ours = plain ÷ ours.
- `ray1`  the same run through pipeline.loop.ray_trainer(cfg).fit() with ONE worker (cpus_per_worker
          = --threads) and the Ray Data reader. ray_overhead = 1 − ray1 ÷ plain images/s (goal
          ≤ 0.10). wall_s and outside_steps_s (Ray start-up, evaluation, checkpoint) are printed
          beside it; they are not in images/s.
- `ray1_local` (only with --only): Ray Train with the in-process reader, to tell Ray Train's share
          of the overhead from Ray Data's.
Beside the mean step (step_ms, the reference's measure), ours and the loop report their median
and fastest single step (step_ms_median, step_ms_min; CPU only for ours) and the process's CPU
seconds per step (cpu_ms_per_step: with --threads 1 it does not move when other processes take
the cores, as wall times do on a shared box; with more threads it counts OpenMP spinning too).
The loop applies bf16 and channels-last only on CUDA (as in training); on CPU only the bare steps
use them. --skip-ray leaves out the Ray modes (ray is imported lazily); plain is reported as
skipped where the facades folder or the data stack (pyarrow, Pillow) is missing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_REF = REPO.parent / "shared" / "bench" / "ref_cyclegan_step.py"
FACADES = REPO.parent / "shared" / "datasets" / "facades"
SAMPLE = REPO / "tests" / "assets" / "facades_small"
MODES = ("ref", "ours", "plain", "ray1")  # the default set
ALL_MODES = (*MODES, "ray1_local")  # ray1_local: Ray Train with the in-process reader (diagnosis)
LOOP_MODES = ("plain", "ray1", "ray1_local")
PERF_KEYS = ("perf/images_per_s", "perf/step_time_s", "perf/data_wait_fraction")


# ============================================================================= arguments


def parse_args(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if gpu else "cpu")
    p.add_argument("--size", type=int, help="image side (default 256 on cuda, 128 on cpu)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, help="timed steps (default 30 on cuda, 2 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10 on cuda, 1 on cpu)")
    p.add_argument("--repeats", type=int, help="rounds of all modes; medians (default 3 on cuda, 1 on cpu)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each net")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL_MODES)}")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray modes (no Ray installed)")
    p.add_argument("--sample", action="store_true", help="loop on tests/assets/facades_small")
    p.add_argument("--src", type=Path, help="image folder to ingest for the loop (default facades)")
    p.add_argument("--ref", type=Path, default=DEFAULT_REF, help="reference step script")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP_NUM_THREADS of all")
    p.add_argument("--child", help=argparse.SUPPRESS)  # run this mode in-process (internal)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return with_defaults(p.parse_args(argv))


def with_defaults(args):
    gpu = args.device == "cuda"
    args.size = args.size or (256 if gpu else 128)
    args.steps = args.steps if args.steps is not None else (30 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.repeats = args.repeats or (3 if gpu else 1)
    args.src = args.src or (SAMPLE if args.sample else FACADES)
    return args


def selected_modes(args) -> list[str]:
    modes = [m.strip() for m in args.only.split(",") if m.strip()] or list(MODES)
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {', '.join(ALL_MODES)}")
    return [m for m in modes if not (args.skip_ray and m.startswith("ray"))]


def common_flags(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--device", args.device]
    return flags + [f for f, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                    ("--compile", args.compile)) if on]


# ============================================================================= orchestration


def run_json(argv: list[str], threads: int) -> dict:
    """Run a measuring subprocess and return its last JSON line (or the error it ended with)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def measure(args, mode: str, data: str | None = None, workdir: str | None = None) -> dict:
    if mode == "ref":
        argv = [sys.executable, str(args.ref), *common_flags(args)]
    else:
        # -m from the repository root (run_json's cwd): a bare checkout (GPU box) has no install
        argv = [sys.executable, "-m", "benchmarks.train_step", "--child", mode]
        argv += ["--threads", str(args.threads)]
        argv += common_flags(args)
        argv += ["--data", data, "--workdir", workdir] if data else []
    start, load = time.perf_counter(), os.getloadavg()[0]
    out = run_json(argv, args.threads)
    if "step_ms" in out:  # the reference rounds images/s to 2 decimals: recompute from step ms
        out["images_per_s"] = round(1000 * args.batch / out["step_ms"], 5)
    return {**out, "mode": mode, "process_s": round(time.perf_counter() - start, 1),
            "load1": [round(load, 2), round(os.getloadavg()[0], 2)]}


def ingest_once(args, workdir: str) -> tuple[str | None, str]:
    """Facades as Parquet, resized once to the loop's load size; (path, why not) on failure."""
    if not args.src.exists():
        return None, f"no data at {args.src}"
    try:
        from pipeline import data

        dst = os.path.join(workdir, "data")
        data.ingest(str(args.src), dst, data.IngestOptions(load_size=load_size(args.size)), progress=False)
        return dst, ""
    except Exception as exc:  # a missing dependency (pyarrow, PIL) only skips the loop figures
        return None, f"ingest failed: {exc!r}"


def load_size(size: int) -> int:
    return size + size // 8  # resize then random-crop `size`, as the quick recipes do


def orchestrate(args) -> list[dict]:
    """Each repeat measures every selected mode once, interleaved, so load drift hits all alike."""
    modes, results = selected_modes(args), []
    with tempfile.TemporaryDirectory(prefix="train_step_") as workdir:
        data, why = ingest_once(args, workdir) if set(modes) & set(LOOP_MODES) else (None, "")
        for repeat in range(args.repeats):
            for mode in modes:
                if mode in LOOP_MODES and not data:
                    out = {"mode": mode, "skipped": why}
                else:
                    out = measure(args, mode, data, workdir)
                results.append(emit({**out, "repeat": repeat}))
    return results


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


# ============================================================================= summary


def median_of(results: list[dict], mode: str, key: str = "images_per_s") -> float | None:
    values = [r[key] for r in results if r["mode"] == mode and r.get(key) is not None]
    return round(statistics.median(values), 5) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def paired(results: list[dict], mode: str, base: str) -> list[float]:
    """mode ÷ base images/s within each repeat (the two ran back to back)."""
    rate = {(r["repeat"], r["mode"]): r.get("images_per_s") for r in results}
    repeats = sorted({r["repeat"] for r in results})
    return [round(rate[k, mode] / rate[k, base], 4) for k in repeats
            if rate.get((k, mode)) and rate.get((k, base))]


def summarize(args, results: list[dict]) -> dict:
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in results)]
    ips = {m: median_of(results, m) for m in modes}
    ms = {m: median_of(results, m, "step_ms") for m in modes}
    each_ms = {m: median_of(results, m, "step_ms_median") for m in modes}
    min_ms = {m: median_of(results, m, "step_ms_min") for m in modes}
    cpu_ms = {m: median_of(results, m, "cpu_ms_per_step") for m in modes}
    overhead = ratio(ips.get("ray1"), ips.get("plain"))
    overhead = round(1 - overhead, 4) if overhead is not None else None
    return {
        "mode": "summary", "device": args.device, "size": args.size, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "amp": args.amp,
        "channels_last": args.channels_last, "compile": args.compile, "threads": args.threads,
        "images_per_s": ips, "step_ms": ms, "step_ms_median": each_ms, "step_ms_min": min_ms,
        "cpu_ms_per_step": cpu_ms,
        "ours_vs_ref": ratio(ips.get("ours"), ips.get("ref")),
        "ours_vs_ref_each": paired(results, "ours", "ref"),
        "plain_vs_ours": ratio(ips.get("plain"), ips.get("ours")),
        "ray1_vs_ours": ratio(ips.get("ray1"), ips.get("ours")),
        "ray_overhead": overhead,
        "ray_overhead_each": [round(1 - x, 4) for x in paired(results, "ray1", "plain")],
        "ray_overhead_goal_met": overhead <= 0.10 if overhead is not None else None,
        "ray_data_share": ratio(ips.get("ray1_local"), ips.get("plain")),
    }


def cell(value, fmt: str = ".1f") -> str:
    return f"{value:>11{fmt}}" if value is not None else f"{'-':>11}"


def print_table(summary: dict, results: list[dict]) -> None:
    notes = {
        "ref": "reference step",
        "ours": f"train_step; ours/ref = {summary['ours_vs_ref']}",
        "plain": f"loop, no Ray; plain/ours = {summary['plain_vs_ours']}",
        "ray1": f"Ray Train 1 worker; overhead = {summary['ray_overhead']} (goal <= 0.10)",
        "ray1_local": f"Ray Train 1 worker, LocalReader; vs plain = {summary['ray_data_share']}",
    }
    print(f"\nmedians of {summary['repeats']} runs; median/min ms: of each run's single steps; "
          "cpu ms: process CPU time per step")
    print(f"{'figure':<11}{'images/s':>11}{'step ms':>11}{'median ms':>11}{'min ms':>11}{'cpu ms':>11}  note")
    for mode, rate in summary["images_per_s"].items():
        failed = [r.get("error") or r.get("skipped") for r in results
                  if r["mode"] == mode and ("error" in r or "skipped" in r)]
        if rate is not None:
            keys = ("step_ms", "step_ms_median", "step_ms_min", "cpu_ms_per_step")
            times = [cell(summary[k][mode]) for k in keys]
            print(f"{mode:<11}{cell(rate, '.4g')}{''.join(times)}  {notes[mode]}")
        elif failed:
            print(f"{mode:<11}{cell(None) * 5}  {failed[0][:90]}")


# ============================================================================= ours: the bare step


def flop_count(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, list[float], float]:
    """Seconds per step, timed as the reference: warm-up, sync, `steps` steps, sync. Also each
    step's own time on CPU (where a step runs synchronously), for a median, and
    the process's CPU seconds per step."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = each = time.perf_counter()
    cpu, times = time.process_time(), []
    for _ in range(steps):
        step()
        times.append(time.perf_counter() - each)
        each = time.perf_counter()
    sync()
    cpu = (time.process_time() - cpu) / steps
    return (time.perf_counter() - start) / steps, times if device.type == "cpu" else [], cpu


def bare_setup(args):
    """Our nets, optimizers, step state and a random tanh batch, as the reference builds its own."""
    import torch

    from models import MODELS

    spec, cfg, device = MODELS["cyclegan"], MODELS["cyclegan"].Config(), torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    nets = spec.build_nets(cfg).to(device, memory_format=fmt).train()
    optimizers = spec.make_optimizers(cfg, nets)
    if args.compile:
        nets = torch.nn.ModuleDict({k: torch.compile(v) for k, v in nets.items()})
    shape = (args.batch, 3, args.size, args.size)
    batch = {k: torch.randn(shape, device=device).tanh().contiguous(memory_format=fmt) for k in "ab"}
    return spec, cfg, device, nets, optimizers, batch


def run_ours(args) -> dict:
    import torch

    spec, cfg, device, nets, optimizers, batch = bare_setup(args)
    state = {}
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext

    def step():
        with amp():
            return spec.train_step(cfg, nets, optimizers, batch, state)

    flops = None if args.compile else flop_count(step)
    dt, times, cpu = time_steps(step, args.warmup, args.steps, device)
    gpu = device.type == "cuda"
    return {
        "batch": args.batch, "size": args.size, "amp": args.amp, "channels_last": args.channels_last,
        "compile": args.compile, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "threads": torch.get_num_threads(), "step_ms": round(dt * 1000, 2),
        "step_ms_median": round(1000 * statistics.median(times), 2) if times else None,
        "step_ms_min": round(1000 * min(times), 2) if times else None,
        "cpu_ms_per_step": round(1000 * cpu, 1),
        "images_per_s": round(args.batch / dt, 4),
        "gflop_per_step": round(flops / 1e9, 1) if flops else None,
        "tflops": round(flops / dt / 1e12, 3) if flops else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
    }


# ============================================================================= plain and ray1: the loop


class PerfRecorder:
    """Stands in for the MLflow tracker: keeps the loop's perf/* metrics of every logged step and,
    given a path, writes them there when the run ends (from inside a Ray worker)."""

    def __init__(self, path: str | None = None):
        self.rows, self.path = [], path

    def log_metrics(self, metrics: dict, step: int) -> None:
        if all(k in metrics for k in PERF_KEYS):
            perf = {k: metrics[k] for k in PERF_KEYS}
            self.rows.append({"step": step, "cpu_s": time.process_time(), **perf})

    def end(self, status: str = "FINISHED") -> None:
        if self.path:
            import torch

            Path(self.path).write_text(json.dumps({"rows": self.rows, "threads": torch.get_num_threads()}))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def factory(self, cfg, rank: int):
        """run_training's tracker factory: this recorder (in a Ray worker, a copy of it; one worker)."""
        return self


def loop_config(args, mode: str, reader: str):
    """The run: our model at its defaults (the reference's architecture), facades at `size`, no MLflow,
    evaluation and checkpoint at the end only; a fresh run name so that nothing resumes."""
    from pipeline import run_config as rc

    total = args.warmup + args.steps
    data = rc.DataSettings(path=args.data, load_size=load_size(args.size), crop_size=args.size, reader=reader)
    scaling = rc.ScalingSettings(use_gpu=args.device == "cuda", cpus_per_worker=args.threads, max_failures=0,
                                 bf16=args.amp, channels_last=args.channels_last, compile=args.compile)
    cfg = rc.make_config(
        "cyclegan", recipe="bench-train-step", data=data, scaling=scaling,
        train=rc.TrainSettings(steps=total, batch_size=args.batch, log_every=1),
        eval=rc.EvalSettings(every=0, max_images=4, grid_rows=2, label_domain=""),
        checkpoint=rc.CheckpointSettings(every=total, keep=1),
        storage=rc.StorageSettings(path=os.path.join(args.workdir, "runs")),
        tracking=rc.TrackingSettings(run_name=f"bench-{mode}-{os.getpid()}", register=False),
        home=os.path.join(args.workdir, "home"),
    )
    rc.validate(cfg)
    return rc.resolve_paths(cfg)


def loop_figures(rows: list[dict], warmup: int, batch: int) -> dict:
    """images/s over the steps after the warm-up: images ÷ the loop's own step times."""
    timed = [r for r in rows if r["step"] > warmup] or rows
    before = [r["cpu_s"] for r in rows if r["step"] == warmup]  # CPU clock after the warm-up
    seconds = sum(r["perf/step_time_s"] for r in timed)
    images = sum(r["perf/images_per_s"] * r["perf/step_time_s"] for r in timed)
    wait = sum(r["perf/data_wait_fraction"] * r["perf/step_time_s"] for r in timed)
    return {
        "images_per_s": round(images / seconds, 4), "step_ms": round(1000 * seconds / len(timed), 2),
        "step_ms_median": round(1000 * statistics.median(r["perf/step_time_s"] for r in timed), 2),
        "step_ms_min": round(1000 * min(r["perf/step_time_s"] for r in timed), 2),
        "cpu_ms_per_step": round(1000 * (timed[-1]["cpu_s"] - before[0]) / len(timed), 1) if before else None,
        "data_wait_fraction": round(wait / seconds, 4), "timed_steps": len(timed), "batch": batch,
        "all_steps_s": round(sum(r["perf/step_time_s"] for r in rows), 2),
    }


def run_plain(args) -> dict:
    import torch

    from pipeline import loop

    cfg, recorder = loop_config(args, "plain", "local"), PerfRecorder()
    start = time.perf_counter()
    loop.run_plain(cfg, make_tracker=recorder.factory)
    wall = time.perf_counter() - start
    out = loop_figures(recorder.rows, args.warmup, args.batch)
    return {**out, "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "outside_steps_s": round(wall - out["all_steps_s"], 1)}


def run_ray1(args, reader: str = "ray") -> dict:
    import ray
    from ray.data import DataContext

    from pipeline import launch, loop

    cfg = loop_config(args, args.child, reader)
    rows_path = os.path.join(args.workdir, f"{cfg.tracking.run_name}.json")
    start = time.perf_counter()  # logical CPUs: the worker's threads, plus room for Ray Data's tasks
    with launch.local_ray_env():  # as a job's own local Ray
        ray.init(num_cpus=args.threads + 2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - start
    try:
        result = loop.ray_trainer(cfg, make_tracker=PerfRecorder(rows_path).factory).fit()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    if result.error:
        raise result.error
    recorded = json.loads(Path(rows_path).read_text())
    out = loop_figures(recorded["rows"], args.warmup, args.batch)
    return {**out, "threads": recorded["threads"], "wall_s": round(wall, 1), "ray_init_s": round(init_s, 1),
            "outside_steps_s": round(wall - out["all_steps_s"], 1)}


# ============================================================================= main


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        runners = {"ours": run_ours, "plain": run_plain, "ray1": run_ray1,
                   "ray1_local": lambda a: run_ray1(a, "local")}
        print(json.dumps(runners[args.child](args)), flush=True)
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results = orchestrate(args)
    summary = emit(summarize(args, results))
    print_table(summary, results)


if __name__ == "__main__":
    main()
