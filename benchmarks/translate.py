"""Batch translation throughput: our job against a plain one-image-at-a-time loop, same generator.

    python -m benchmarks.translate                          # CPU: 64 px, default-width CycleGAN G
    python -m benchmarks.translate --size 128 --images 64 --ray --actors 2
    python -m benchmarks.translate --model models:/cyclegan_facades-quick-ab/1 --size 32
    python -m benchmarks.translate --core --device cuda --size 256 --batch-size 64 128 256   # a GPU box

Default mode, on CPU (prints images/s for each; both sides take turns, best of --repeats rounds,
with --threads torch threads: default 1, so the figures are per core and survive shared machines):
- plain loop, the reference `test.py` style: build the generator once, then per image open the
  JPEG, make a 1×C×H×W tensor, run G in eval mode under no_grad, save a PNG (pillow's default
  level);
- our job, `pipeline.translate.run` without Ray: plan (list and hash the inputs), batches of
  --batch-size, PNG outputs with lineage, manifest commits; with --ray also through Ray Data
  (`map_batches` on --actors CPU actors, one torch thread each; Ray's start-up is not timed, the
  actor pool's, once per run as in a scheduled job, is).
Inputs are the facades photos (left halves) resized to the model's size, so neither side resizes.

--core measures the plain-torch core (pipeline/translate/core.py) where Ray does not fit (the GPU
box): `Translator` on uint8 batches already in host memory (host->device copy, float conversion,
G under bf16 autocast in channels-last, uint8 back to host) and, with --with-io, `BatchTranslator`
on encoded JPEG rows (decode and PNG encode on --io-workers threads, files written to a temp dir).
The goal on one H100 is >= 1500 images/s at 256² for the default CycleGAN generator.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import MODELS
from pipeline import launch, translate

ROOT = Path(__file__).resolve().parents[1]

FACADES = ROOT / "tests" / "assets" / "facades_small"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="a registered model / checkpoint (default: CycleGAN G, default widths)")
    p.add_argument("--tracking-uri")
    p.add_argument("--size", type=int, help="image size (default 64; a given --model brings its own)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, nargs="+", action="extend", default=None,
                   help="one or more batch sizes (repeatable; default 16)")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data path")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--core", action="store_true", help="time the plain-torch core only (GPU box)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--with-io", action="store_true", help="--core: include JPEG decode and PNG encode")
    p.add_argument("--io-workers", type=int, default=4, help="decode / encode / write threads per worker")
    p.add_argument("--compile", action="store_true", help="--core: torch.compile the generator")
    p.add_argument("--repeats", type=int, default=2, help="best of this many timed passes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the plain loop and of our job without Ray (default 1: per core)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or [16]  # a default list would be extended, not replaced
    return args


def default_payload(size: int) -> tuple[translate.GeneratorArtifact, translate.ModelInfo]:
    """CycleGAN's G_ab with the paper's widths (ngf 64, 9 residual blocks), random weights."""
    spec = MODELS["cyclegan"]
    cfg = spec.Config()
    torch.manual_seed(0)
    net = spec.build_nets(cfg)["G_ab"]
    generator = translate.GeneratorArtifact.from_net("cyclegan", cfg, "ab", net, size, False)
    key = translate.weights_key(generator.weights)
    return generator, translate.ModelInfo("cyclegan-default", None, None, "random", key)


def load_payload(args) -> tuple[translate.GeneratorArtifact, translate.ModelInfo]:
    if args.model:
        return translate.load_model(args.model, args.tracking_uri, size=args.size)
    return default_payload(args.size or 64)


def make_inputs(folder: Path, n: int, size: int) -> list[Path]:
    """n distinct JPEG photos at size×size (facades left halves, cycled with a small shift)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(FACADES.glob("*/*.jpg"))
    paths = []
    for i in range(n):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        shift = i // len(sources)  # later rounds crop one pixel further in: different bytes
        photo = img.crop((shift, shift, img.width // 2 - shift, img.height - shift)).resize((size, size))
        paths.append(folder / f"{i:05d}.jpg")
        photo.save(paths[-1], quality=95)
    return paths


def best_rate(fn, count: int, repeats: int) -> float:
    return best_rates({"x": fn}, count, repeats)["x"]


def best_rates(fns: dict, count: int, repeats: int) -> dict:
    """Best images/s of each function; the functions take turns in every round, so that a machine
    whose load drifts (shared cores) treats them alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], count / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------- the two sides


def plain_loop(payload, paths: list[Path], out: Path) -> None:
    """One image at a time, as a reference test.py does it."""
    payload = payload[0]
    spec, cfg, net = payload.spec, payload.config, payload.build()
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in paths:
            pixels = np.array(Image.open(path).convert("RGB"))
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
            y = spec.translate(cfg, {payload.net_name: net}, x, payload.direction)
            image = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(image).save(out / (path.stem + ".png"))


def our_job(payload, inputs: Path, out: Path, batch_size: int, use_ray: bool, actors: int,
            io_workers: int) -> dict:
    """One fresh run into a new folder under `out` (removing old outputs is not part of a run)."""
    out.mkdir(parents=True, exist_ok=True)
    job = translate.Job(*payload, tempfile.mkdtemp(dir=out), batch_size=batch_size, io_workers=io_workers)
    options = translate.RunOptions(use_ray=use_ray, actors=actors, progress=False, commit_every_s=1.0)
    return translate.run(job, translate.Source(str(inputs)), options)


def compare(args) -> None:
    payload = load_payload(args)
    generator, info = payload
    size = generator.size
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "in")
        paths = make_inputs(inputs, args.images, size)
        print(f"{args.images} images {size}x{size}, {generator.model_name} {info.name}, "
              f"{torch.get_num_threads()} torch threads, CPU")
        sides = {"plain": lambda: plain_loop(payload, paths, Path(tmp, "plain"))}
        for batch in args.batch_size:
            sides[batch] = lambda b=batch: our_job(payload, inputs, Path(tmp, "ours"), b, False, 1,
                                                   args.io_workers)
        rates = best_rates(sides, len(paths), args.repeats)
        plain = rates["plain"]
        print(f"plain loop (one image at a time):      {plain:8.1f} images/s")
        for batch in args.batch_size:
            print(f"our job, no Ray, batch {batch:<4}          {rates[batch]:8.1f} images/s  "
                  f"({rates[batch] / plain:.2f}x)")
        if args.ray:
            ray_side(args, payload, paths, inputs, Path(tmp))


def ray_side(args, payload, paths: list[Path], inputs: Path, tmp: Path) -> None:
    """Ray Data on --actors one-CPU actors, beside the plain loop again (Ray's processes share the
    cores). Each run starts its actor pool, as a scheduled job does; Ray itself is up already."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    batch = args.batch_size[0]
    sides = {"plain": lambda: plain_loop(payload, paths, tmp / "plain"),
             "ray": lambda: our_job(payload, inputs, tmp / "ours", batch, True, args.actors, args.io_workers)}
    rates = best_rates(sides, len(paths), args.repeats)
    print(f"plain loop, beside Ray:                {rates['plain']:8.1f} images/s")
    print(f"our job, Ray, {args.actors} actors, batch {batch:<4}  {rates['ray']:8.1f} images/s  "
          f"({rates['ray'] / rates['plain']:.2f}x)")
    ray.shutdown()


# ----------------------------------------------------------------------------- the core alone


def core(args) -> None:
    payload = load_payload(args)
    generator, info = payload
    translator = translate.Translator(generator, args.device)
    if args.compile:
        translator.net = translator.nets[generator.net_name] = torch.compile(translator.net)
    size = generator.size
    print(f"core on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"{generator.model_name} {info.name}, {size}x{size}, bf16={translator.autocast}")
    rng = np.random.default_rng(0)
    for batch in args.batch_size:
        pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
        steps = max(2, args.images // batch)
        run_core = lambda p=pixels, n=steps: [  # noqa: E731
            translator.to_pixels(translator.forward(translator.to_tensor(p))) for _ in range(n)]
        run_core()  # warm-up (cuDNN autotuning, compilation)
        rate = best_rate(run_core, steps * batch, args.repeats)
        print(f"core, batch {batch:<4} uint8 in -> uint8 out:          {rate:9.1f} images/s")
        if args.with_io:
            rate = io_rate(args, payload, batch)
            print(f"core + JPEG decode + PNG encode, batch {batch:<4} {rate:9.1f} images/s")


def io_rate(args, payload, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(Path(tmp, "in"), batch, payload[0].size)
        rows = [{"id": p.name, "sha256": p.stem, "image": p.read_bytes()} for p in paths]
        tasks = {r["id"]: translate.Task(r["id"], r["sha256"], Path(r["id"]).stem, [0]) for r in rows}
        job = translate.Job(*payload, str(Path(tmp, "out")), batch_size=batch, device=args.device,
                            io_workers=args.io_workers)
        worker = translate.BatchTranslator(translate.Work(job, tasks=tasks))
        worker.process(rows)  # warm-up
        steps = max(2, args.images // batch)
        return best_rate(lambda: [worker.process(rows) for _ in range(steps)], steps * batch, args.repeats)


def main(argv=None) -> None:
    launch.quiet()  # telemetry off before anything imports mlflow
    args = parse_args(argv)
    core(args) if args.core else compare(args)


if __name__ == "__main__":
    main()
