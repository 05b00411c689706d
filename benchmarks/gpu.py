"""Every GPU figure of issue 15 in one run, within about 5 minutes on one H100/H200 (`benchmarks/gpu.sh`).

    bash benchmarks/gpu.sh                       # the GPU box: CycleGAN at 256², all figures
    bash benchmarks/gpu.sh --device cpu --size 32 --width 4 ...   # the CPU smoke test's tiny run

Needs torch, numpy, Pillow, pyarrow and safetensors only: never Ray, MLflow or boto3 (the GPU box
has none of them; tests/test_gpu_bench.py runs this with them blocked). Figures, in this order (each
stage starts only while --budget-s leaves it time; a skipped one says so):
1. `step`: our CycleGAN `train_step` (default architecture: ResNet-9 G, 70×70 PatchGAN, ngf = ndf
   = 64, instance norm, LSGAN, identity, pool 50) on random tanh inputs, timed as the reference
   times its own (warm-up, sync, --steps steps, sync): fp32 at batch 1 (the canonical step), then
   bf16 autocast + channels-last (the loop's defaults on CUDA) at every --batches size; the best
   batch is the one with the most images/s.
2. `ref`: ../shared/bench/ref_cyclegan_step.py (--ref; on the GPU box carry a copy) in its own
   process at fp32 batch 1 and at bf16 + channels-last at the best batch, interleaved with ours at
   the same setting in the same repeat: ours_vs_ref = ours ÷ ref images/s (goal ≥ 1).
3. `loop`: pipeline.loop.run_plain (no Ray), LocalReader on tests/assets/facades_small copied up to
   --loop-images and ingested at size + size/8 (random crop `size`), log every 10 steps (the step
   itself issues no host sync), no evaluation, one checkpoint at the end (not timed): images/s is
   the loop's own perf/images_per_s after the warm-up, data wait included; at batch 1 and the best.
4. `translate`: pipeline.translate.core.Translator (the plain-torch core of batch translation):
   uint8 images in host memory -> pinned copy -> float -> generator under bf16 autocast in
   channels-last -> uint8 back on the host, at each --translate-batches size (goal on one H100:
   ≥ 1500 images/s at 256²); PNG and JPEG encoding with lineage on --io-workers threads apart.
5. `compile`: step 1 at the best batch with torch.compile of each net, in its own process under
   the time left (compile time reported apart); compile_gain = compiled ÷ eager images/s: keep
   scaling.compile off unless it is clearly > 1.
Every figure is the median of --repeats runs with its spread ((max − min) ÷ median), beside the
peak GPU memory (torch.cuda.max_memory_allocated since the figure began) and the process's RSS
(now and its peak so far; a child process's own for ref and compile). One JSON line per figure,
then a summary line and a table.
"""

import argparse
import dataclasses
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REF = REPO.parent / "shared" / "bench" / "ref_cyclegan_step.py"
SAMPLE = REPO / "tests" / "assets" / "facades_small"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if gpu else "cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="bf16 step sweep")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, help="ngf = ndf of ours (default: the paper's 64; tests: tiny)")
    p.add_argument("--ref", type=Path, default=Path(os.environ.get("REF_STEP", DEFAULT_REF)))
    p.add_argument("--loop-images", type=int, default=96, help="training images for the loop figure")
    p.add_argument("--loop-steps", type=int, default=30, help="timed loop steps (after --warmup rounded up)")
    p.add_argument("--log-every", type=int, default=10, help="the loop's train.log_every (its only syncs)")
    p.add_argument("--translate-batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--translate-images", type=int, default=1024, help="images per translation repeat")
    p.add_argument("--io-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile figure")
    p.add_argument("--compile-timeout", type=float, default=150.0)
    p.add_argument("--budget-s", type=float, default=290.0, help="stages start only while time is left")
    p.add_argument("--child", help=argparse.SUPPRESS)  # compile | ref: one measurement in this process
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ============================================================================= measuring


def rss_gb() -> tuple[float, float]:
    """(resident now, peak so far) of this process, GB."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return round(now / 2**30, 3), round(peak / 2**30, 3)


def memory(device) -> dict:
    now, peak = rss_gb()
    peak = max(now, peak)  # the two counters round pages differently
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"gpu_peak_gb": round(gpu, 3) if gpu is not None else None, "rss_gb": now, "rss_peak_gb": peak}


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": round(med, 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "spread": round((max(values) - min(values)) / med, 4) if med else None,
            "runs": [round(v, 4) for v in values]}


def timed_rate(work, images: int, warmup: int, steps: int, device) -> float:
    """images/s of `work()` over `steps` calls between two syncs, after `warmup` calls."""
    for _ in range(warmup):
        work()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        work()
    sync(device)
    return images * steps / (time.perf_counter() - start)


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


# ============================================================================= 0. no host sync in a step


def sync_check(args) -> dict:
    """Every model's `train_step` (default config, batch 2, at 256² or the size its config fixes)
    under torch.cuda.set_sync_debug_mode("error") after two warm-up steps: any host sync in a step
    (an .item(), a float(), a data-dependent shape) raises. CUDA only."""
    from models import MODELS

    if args.device != "cuda":
        return emit({"figure": "sync_check", "skipped": "cuda only"})
    device, synced = torch.device("cuda"), {}
    for name, spec in MODELS.items():
        cfg = spec.Config()
        size = spec.image_size(cfg) or 256
        nets = spec.build_nets(cfg).to(device).train()
        optimizers = spec.make_optimizers(cfg, nets)
        one = {k: torch.randn(2, getattr(cfg, f"channels_{k}"), size, size, device=device).tanh()
               for k in "ab"}
        per_step = spec.batches_per_step(cfg)
        batch = one if per_step == 1 else [one] * per_step
        state = {}
        for debug in (0, 0, "error", "error"):
            torch.cuda.set_sync_debug_mode(debug)
            try:
                losses = spec.train_step(cfg, nets, optimizers, batch, state)
            except RuntimeError as exc:
                synced[name] = str(exc).splitlines()[0][:120]
                break
            finally:
                torch.cuda.set_sync_debug_mode(0)
        else:
            if not all(isinstance(v, torch.Tensor) for v in losses.values()):
                synced[name] = "losses are not tensors"
        del nets, optimizers, state
    return emit({"figure": "sync_check", "models": len(MODELS), "synced": synced, "ok": not synced})


# ============================================================================= 1. our step


def step_setup(args, batch: int, amp: bool, channels_last: bool, compile_nets: bool = False):
    """Our CycleGAN (default architecture, or --width) and a random tanh batch; a step closure."""
    from models import MODELS

    spec, device = MODELS["cyclegan"], torch.device(args.device)
    cfg = spec.Config(**({"ngf": args.width, "ndf": args.width} if args.width else {}))
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nets = spec.build_nets(cfg).to(device, memory_format=fmt).train()
    optimizers = spec.make_optimizers(cfg, nets)
    if compile_nets:
        nets = torch.nn.ModuleDict({k: torch.compile(v) for k, v in nets.items()})
    shape = (batch, 3, args.size, args.size)
    data = {k: torch.randn(shape, device=device).tanh().contiguous(memory_format=fmt) for k in "ab"}
    state = {}
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext

    def step():
        with context():
            return spec.train_step(cfg, nets, optimizers, data, state)

    return step


def measure_ours(args, batch: int, amp: bool, repeats: int | None = None) -> dict:
    device = torch.device(args.device)
    reset_memory(device)
    step = step_setup(args, batch, amp, channels_last=amp)
    rates = [timed_rate(step, batch, args.warmup if r == 0 else 1, args.steps, device)
             for r in range(repeats or args.repeats)]
    out = {"figure": "step", "batch": batch, "bf16_channels_last": amp, "images_per_s": spread(rates),
           **memory(device)}
    del step
    return out


def sweep(args) -> list[dict]:
    """fp32 batch 1, then bf16 + channels-last at each batch (stops at the first out-of-memory)."""
    rows = [emit(measure_ours(args, 1, amp=False))]
    for batch in args.batches:
        try:
            rows.append(emit(measure_ours(args, batch, amp=True)))
        except torch.cuda.OutOfMemoryError:
            emit({"figure": "step", "batch": batch, "skipped": "out of memory"})
            break
    return rows


def best_batch(rows: list[dict]) -> int:
    amp = [r for r in rows if r.get("bf16_channels_last") and "images_per_s" in r]
    return max(amp, key=lambda r: r["images_per_s"]["median"])["batch"] if amp else 1


# ============================================================================= 2. the reference


def ref_argv(args, batch: int, amp: bool) -> list[str]:
    """The reference script in a child that also prints the child's peak RSS (one more JSON line)."""
    flags = ["--batch", str(batch), "--size", str(args.size), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--device", args.device]
    flags += ["--amp", "--channels-last"] if amp else []
    wrapper = ("import json, resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__'); "
               "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
               "print(json.dumps({'rss_peak_gb': peak / 2**20}))")
    return [sys.executable, "-c", wrapper, str(args.ref), *flags]


def run_child(argv: list[str], timeout: float) -> list[dict]:
    """The JSON lines a child printed; raises RuntimeError with its last words when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from exc
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        last = (proc.stderr or proc.stdout).splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(last))
    return lines


def compare_ref(args, settings: list[tuple[int, bool]], deadline: float) -> list[dict]:
    """Ref and ours at each (batch, bf16 + channels-last) setting, interleaved per repeat."""
    if not args.ref.exists():
        return [emit({"figure": "ref", "skipped": f"no reference script at {args.ref} (--ref or REF_STEP)"})]
    rows = []
    for batch, amp in settings:
        ref, ours, ref_rss, ref_gpu = [], [], [], []
        for _ in range(args.repeats):
            if time.perf_counter() > deadline:
                break
            lines = run_child(ref_argv(args, batch, amp), timeout=max(10.0, deadline - time.perf_counter()))
            result = next(line for line in lines if "step_ms" in line)
            ref.append(1000 * batch / result["step_ms"])  # it rounds images/s to 0.01
            ref_gpu.append(result.get("peak_mem_gb"))
            ref_rss.append(lines[-1].get("rss_peak_gb"))
            ours.append(measure_ours(args, batch, amp, repeats=1)["images_per_s"]["median"])
        if not ref:
            rows.append(emit({"figure": "ref", "batch": batch, "skipped": "no time left"}))
            continue
        each = [o / r for o, r in zip(ours, ref, strict=True)]
        rows.append(emit({
            "figure": "ref", "batch": batch, "bf16_channels_last": amp, "ref_images_per_s": spread(ref),
            "ours_images_per_s": spread(ours), "ours_vs_ref": spread(each),
            "ref_gpu_peak_gb": ref_gpu[-1], "ref_rss_peak_gb": round(max(x or 0 for x in ref_rss), 3),
            **memory(torch.device(args.device)),
        }))
    return rows


# ============================================================================= 3. the loop without Ray


def loop_data(args, workdir: str) -> str:
    """facades_small's training pairs copied up to --loop-images, ingested at the loop's load size."""
    from pipeline import data

    src = Path(workdir, "src", "train")
    src.mkdir(parents=True)
    found = sorted((SAMPLE / "train").iterdir())
    for i in range(max(args.loop_images, len(found))):
        shutil.copyfile(found[i % len(found)], src / f"{i:05d}{found[i % len(found)].suffix}")
    dst = os.path.join(workdir, "data")
    options = data.IngestOptions(load_size=args.size + args.size // 8)
    data.ingest(str(src.parent), dst, options, progress=False)
    return dst


def loop_rate(args, data_path: str, workdir: str, batch: int, run: int) -> dict:
    """One run_plain run; its perf/* rows after the warm-up (whole log windows)."""
    from benchmarks.train_step import PerfRecorder, loop_figures
    from pipeline import loop
    from pipeline import run_config as rc

    every = args.log_every
    warmup = -(-args.warmup // every) * every  # whole log windows
    total = warmup + max(every, args.loop_steps // every * every)
    cuda = args.device == "cuda"
    model = {"ngf": args.width, "ndf": args.width} if args.width else {}
    from models import MODELS

    cfg = rc.make_config(
        "cyclegan", recipe="bench-gpu",
        data=rc.DataSettings(path=data_path, load_size=args.size + args.size // 8, crop_size=args.size,
                             reader="local"),
        scaling=rc.ScalingSettings(use_gpu=cuda, max_failures=0),  # bf16 + channels-last: the defaults
        train=rc.TrainSettings(steps=total, batch_size=batch, log_every=every),
        eval=rc.EvalSettings(every=0, max_images=4, grid_rows=2, label_domain=""),
        checkpoint=rc.CheckpointSettings(every=total, keep=1),
        storage=rc.StorageSettings(path=os.path.join(workdir, "runs")),
        tracking=rc.TrackingSettings(run_name=f"bench-gpu-{batch}-{run}", register=False),
        home=os.path.join(workdir, "home"),
    )
    cfg = dataclasses.replace(cfg, model=MODELS["cyclegan"].Config(**model))
    rc.validate(cfg)
    recorder = PerfRecorder()
    loop.run_plain(rc.resolve_paths(cfg), make_tracker=recorder.factory, make_evaluator=lambda *a: None)
    return loop_figures(recorder.rows, warmup, batch)


def measure_loop(args, batches: list[int], deadline: float) -> list[dict]:
    device, rows = torch.device(args.device), []
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as workdir:
        data_path = loop_data(args, workdir)
        for batch in batches:
            reset_memory(device)
            runs = [loop_rate(args, data_path, workdir, batch, r) for r in range(args.repeats)
                    if time.perf_counter() < deadline]
            if not runs:
                rows.append(emit({"figure": "loop", "batch": batch, "skipped": "no time left"}))
                continue
            rows.append(emit({
                "figure": "loop", "batch": batch, "images_per_s": spread([r["images_per_s"] for r in runs]),
                "data_wait_fraction": spread([r["data_wait_fraction"] for r in runs]), **memory(device)}))
    return rows


# ============================================================================= 4. batch translation


def translator(args):
    from models import MODELS
    from pipeline.generator_artifact import GeneratorArtifact
    from pipeline.translate.core import Translator

    spec = MODELS["cyclegan"]
    cfg = spec.Config(**({"ngf": args.width, "ndf": args.width} if args.width else {}))
    net = spec.build_nets(cfg)["G_ab"]
    artifact = GeneratorArtifact.from_net("cyclegan", cfg, "ab", net, size=args.size, swap_ab=False)
    return Translator(artifact, args.device)


def measure_translate(args, deadline: float) -> list[dict]:
    """The core at each batch size: uint8 host images -> uint8 host outputs; then encoding apart."""
    import numpy as np

    from pipeline.translate.core import encode_output

    device, rows = torch.device(args.device), []
    core = translator(args)
    rng = np.random.default_rng(0)
    for batch in args.translate_batches:
        if time.perf_counter() > deadline:
            rows.append(emit({"figure": "translate", "batch": batch, "skipped": "no time left"}))
            continue
        reset_memory(device)
        pixels = list(rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8))
        calls = max(1, args.translate_images // batch)
        work = functools.partial(core.translate, pixels, keep_size=False)
        rates = [timed_rate(work, batch, 1, calls, device) for _ in range(args.repeats)]
        rows.append(emit({"figure": "translate", "batch": batch, "images_per_s": spread(rates),
                          **memory(device)}))
    outputs = core.translate(pixels, keep_size=False)
    for fmt in ("png", "jpeg"):
        rows.append(emit(measure_encoding(args, outputs, fmt, encode_output)))
    return rows


def measure_encoding(args, outputs: list, fmt: str, encode) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    lineage = {"model": "bench", "input": "x" * 40}
    with ThreadPoolExecutor(args.io_workers) as pool:
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            list(pool.map(lambda o: encode(o, fmt, lineage), outputs))
            rates.append(len(outputs) / (time.perf_counter() - start))
    return {"figure": f"encode_{fmt}", "io_workers": args.io_workers, "images": len(outputs),
            "images_per_s": spread(rates), **memory(torch.device("cpu"))}


# ============================================================================= 5. torch.compile


def measure_compile(args, batch: int, eager: dict | None, deadline: float) -> dict:
    left = min(args.compile_timeout, deadline - time.perf_counter())
    if left < 20:
        return emit({"figure": "compile", "batch": batch, "skipped": f"{left:.0f} s left"})
    argv = [sys.executable, "-m", "benchmarks.gpu", "--child", "compile", "--batch", str(batch), "--amp",
            "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    argv += ["--width", str(args.width)] if args.width else []
    try:
        out = run_child(argv, timeout=left)[-1]
    except RuntimeError as exc:
        return emit({"figure": "compile", "batch": batch, "skipped": str(exc)})
    if eager:
        out["compile_gain"] = round(out["images_per_s"]["median"] / eager["images_per_s"]["median"], 4)
    return emit(out)


def compile_child(args) -> dict:
    device = torch.device(args.device)
    reset_memory(device)
    step = step_setup(args, args.batch, args.amp, channels_last=args.amp, compile_nets=True)
    start = time.perf_counter()
    step()
    sync(device)
    compile_s = time.perf_counter() - start
    rates = [timed_rate(step, args.batch, args.warmup if r == 0 else 1, args.steps, device)
             for r in range(args.repeats)]
    return {"figure": "compile", "batch": args.batch, "bf16_channels_last": args.amp,
            "compile_s": round(compile_s, 1), "images_per_s": spread(rates), **memory(device)}


# ============================================================================= main


def summarize(args, rows: list[dict], wall: float) -> dict:
    def pick(figure, batch=None, amp=None):
        return next((r for r in rows if r.get("figure") == figure and "skipped" not in r
                     and (batch is None or r.get("batch") == batch)
                     and (amp is None or r.get("bf16_channels_last") == amp)), None)

    best = best_batch(rows)
    median = lambda r, key="images_per_s": r[key]["median"] if r else None  # noqa: E731
    translate = [r for r in rows if r.get("figure") == "translate" and "skipped" not in r]
    top = max(translate, key=lambda r: r["images_per_s"]["median"]) if translate else None
    return {
        "figure": "summary", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "size": args.size, "best_batch": best, "wall_s": round(wall, 1),
        "step_fp32_batch1": median(pick("step", 1, False)),
        "step_bf16_batch1": median(pick("step", 1, True)),
        "step_bf16_best": median(pick("step", best, True)), "goal_step_best": 120,
        "ours_vs_ref_fp32_batch1": median(pick("ref", 1, False), "ours_vs_ref"),
        "ours_vs_ref_bf16_best": median(pick("ref", best, True), "ours_vs_ref"),
        "loop_batch1": median(pick("loop", 1)), "loop_best": median(pick("loop", best)),
        "translate_best": median(top), "translate_best_batch": top["batch"] if top else None,
        "goal_translate": 1500,
        "encode_png": median(pick("encode_png")), "encode_jpeg": median(pick("encode_jpeg")),
        "compile_gain": (pick("compile") or {}).get("compile_gain"),
        "sync_check_ok": (pick("sync_check") or {}).get("ok"),
    }


def table_note(r: dict) -> str:
    if r["figure"] == "ref":
        return f"ref {r['ref_images_per_s']['median']:.4g}/s; ours/ref {r['ours_vs_ref']['median']}"
    if r["figure"] == "compile":
        return f"compile {r['compile_s']} s; gain {r.get('compile_gain')}"
    if r["figure"] == "loop":
        return f"data wait {r['data_wait_fraction']['median']}"
    return ""


def print_table(rows: list[dict]) -> None:
    print(f"\n{'figure':<12}{'batch':>6}{'bf16+CL':>8}{'images/s':>11}{'spread':>8}{'GPU GB':>8}"
          f"{'RSS GB':>8}  note")
    for r in rows:
        if r.get("figure") == "summary":
            continue
        if r.get("figure") == "sync_check" and "skipped" not in r:
            verdict = "no host sync in any train_step" if r["ok"] else r["synced"]
            print(f"{'sync_check':<12}{'':>33}  {verdict}")
            continue
        if "skipped" in r:
            print(f"{r['figure']:<12}{r.get('batch', ''):>6}{'':>8}{'-':>11}{'':>24}  {r['skipped'][:70]}")
            continue
        rate = r.get("images_per_s") or r["ours_images_per_s"]
        note = table_note(r)
        gpu = r.get("gpu_peak_gb")
        print(f"{r['figure']:<12}{r.get('batch', ''):>6}{str(r.get('bf16_channels_last', '')):>8}"
              f"{rate['median']:>11.4g}{rate['spread']:>8.3f}{(f'{gpu:.2f}' if gpu is not None else '-'):>8}"
              f"{r['rss_gb']:>8.2f}  {note}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child == "compile":
        print(json.dumps(compile_child(args)), flush=True)
        return
    start = time.perf_counter()
    deadline = start + args.budget_s
    rows = [sync_check(args)]
    rows += sweep(args)
    best = best_batch(rows)
    rows += compare_ref(args, [(1, False), (best, True)], deadline)
    rows += measure_loop(args, sorted({1, best}), deadline)
    rows += measure_translate(args, deadline)
    if not args.no_compile:
        eager = next((r for r in rows if r["figure"] == "step" and r.get("batch") == best
                      and r.get("bf16_channels_last")), None)
        rows.append(measure_compile(args, best, eager, deadline))
    rows.append(emit(summarize(args, rows, time.perf_counter() - start)))
    print_table(rows)


if __name__ == "__main__":
    main()
