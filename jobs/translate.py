"""Translate images in bulk with a trained generator; incremental, idempotent, with lineage per output.

    python jobs/translate.py --model cyclegan_facades-ab@production --input photos/ --output out/
    python jobs/translate.py --model models:/cyclegan_facades-ab/3 --input data/facades --split test \\
        --output s3://bucket/facades-ab --format parquet --actors 4 --batch-size 32
    python jobs/translate.py --model ~/.transmute/runs/RUN --direction ba --input labels/ --output out/
    python jobs/translate.py --model bicyclegan_facades-ab/2 --input labels/ --output grid/ --samples 8 \
        --z linear
    python jobs/translate.py --model cogan_digits-pair@production --pairs 1000 --output pairs/
    ray job submit --working-dir . -- python jobs/translate.py --model NAME@production --input SRC \
        --output DST

--model: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `NAME/VERSION`, `NAME@ALIAS`, `NAME` (its
latest version), `runs:/RUN_ID/generator_ab`, a logged model directory, or a training checkpoint
(a checkpoint_NNNNNNNN folder or a run folder holding them). The model brings its own config, image
size and direction. --input: a dataset made by prepare_data.py (Parquet + _manifest.json) or a
folder of images, local or s3://. --output: PNG/JPEG files named after the inputs, or Parquet
shards, with `_manifest.json` holding each output's lineage.

A rerun translates only what the output does not list yet for this model version and these
settings (by input sha256 and sample); a killed run is completed by running it again. Inputs of
another size are resized to the model's size and the outputs brought back (--no-keep-size keeps
the model's size). Unreadable images are listed and skipped (by content, or by path when they
cannot be read at all) and not retried; the exit status is 1 only with --strict (any rejected
input) or when nothing at all could be translated, 2 for a usage error or a corrupt checkpoint.
Where it runs: without --ray or --no-ray (auto), the first batch is translated in this process and
timed; the rest goes on Ray actors only when the count is above the crossover where Ray's start-up
pays for itself (a Ray address, --address or $RAY_ADDRESS, means Ray); the summary and the run's
`ran` say which and why. --ray and --no-ray force either.
MLflow: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db as jobs/train.py.
"""

import argparse
import os
import shlex
import sys

from pipeline import cli, launch, storage
from pipeline.launch import init_ray
from pipeline.terminal import next_step
from pipeline.translate.outputs import OUTPUT_INDEX


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + cli.EXIT_STATUS)
    p.add_argument("--model", required=True, help="registered model, run model or checkpoint (see below)")
    p.add_argument("--input", help="prepare_data.py dataset or folder of images (local or s3://)")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--split", action="append", default=[],
                   help="dataset input: split(s) to read (default all)")
    p.add_argument("--direction", help="checkpoint: which generator (ab, ba); registered models have one")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "parquet"])
    p.add_argument("--bn-mode", default="auto", choices=["auto", "per_image", "eval", "train"],
                   help="auto (default): per_image for a batch-norm generator (each image normalised by "
                        "its own statistics, as the pix2pix and DualGAN test scripts), eval otherwise; "
                        "eval: running statistics; train: batch statistics of the whole batch, dropout "
                        "on, as seed 000 compared (outputs then depend on the batch)")
    p.add_argument("--dropout", action="store_true",
                   help="keep dropout on at test time, as pix2pix's test script (outputs vary per run)")
    p.add_argument("--samples", type=int, default=1, help="BicycleGAN: outputs per input, one z each")
    p.add_argument("--z", dest="z_mode", default="random", choices=["random", "linear", "zero"],
                   help="BicycleGAN: z ~ N(0, I) per sample, a linear interpolation grid, or zeros")
    p.add_argument("--seed", type=int, default=0, help="BicycleGAN / CoGAN: base of the recorded z seeds")
    p.add_argument("--pairs", type=int, default=0, help="CoGAN: number of generated pairs (no --input)")
    p.add_argument("--half", choices=["a", "b", "whole"],
                   help="a folder of pair images (width = 2 x height, A|B side by side): translate the left "
                        "(a) or right (b) half, or the whole image; default: the half the model was trained "
                        "on, for a model trained on aligned pairs (else the job refuses pairs)")
    p.add_argument("--keep-size", action=argparse.BooleanOptionalAction, default=True,
                   help="bring each output back to its input's size (default on)")
    p.add_argument("--size", type=int, help="only for a model that records no training size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actors", type=int, default=1, help="Ray: actors, each holding the generator once")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=1.0, help="used when the device is cuda")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when the Ray cluster (or, with --no-ray, this machine) has a GPU")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="GPU: run in float32")
    p.add_argument("--io-workers", type=int, default=0,
                   help="threads reading, decoding, encoding and writing beside the net, per worker "
                        "(default: 4 on CPU, 8 on GPU; file writes wait on fsync)")
    ray = p.add_mutually_exclusive_group()
    ray.add_argument("--ray", dest="mode", action="store_const", const="ray",
                     help="translate on Ray actors whatever the count (default: auto, see below)")
    ray.add_argument("--no-ray", dest="mode", action="store_const", const="local",
                     help="translate in this process, without Ray")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="redo every output")
    p.add_argument("--strict", action="store_true", help="exit 1 when any input is rejected")
    p.add_argument("--commit-every", type=float, default=1.0, metavar="SECONDS",
                   help="rewrite the manifest after a block at most this often (0: after every block)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: see below)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL for s3:// input and output")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    launch.verbose_flag(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.pairs and args.input:
        raise ValueError("--pairs generates CoGAN pairs from z and reads no input: drop --input")
    if not args.pairs and not args.input:
        raise ValueError("--input is required (a prepare_data.py dataset or a folder of images)")
    if args.batch_size < 1 or args.actors < 1:
        raise ValueError("--batch-size and --actors must be >= 1")


def build_job(args, generator, info, device: str):
    from models import MODELS
    from pipeline.translate import Job, Settings

    generates_pairs = MODELS[generator.model_name].generates_pairs
    if generates_pairs and not args.pairs:
        raise ValueError(f"{args.model} is a {generator.model_name}: it generates pairs from z; "
                         "pass --pairs N instead of --input")
    if args.pairs and not generates_pairs:
        raise ValueError(f"--pairs is for models that generate pairs from z (CoGAN); {args.model} is a "
                         f"{generator.model_name}")
    settings = Settings(args.format, args.bn_mode, args.z_mode, args.seed, args.keep_size, args.dropout)
    io_workers = args.io_workers or (8 if device == "cuda" else 4)
    return Job(generator, info, _absolute(args.output), settings, args.samples, batch_size=args.batch_size,
               device=device, bf16=args.bf16, io_workers=io_workers, endpoint=args.s3_endpoint,
               half=args.half)


def _absolute(path: str) -> str:
    """Absolute, so that a job run from an unpacked --working-dir writes where the user meant."""
    return path if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))


def pick_device(args, use_ray: bool) -> str:
    if args.device != "auto":
        return args.device
    if use_ray:
        import ray

        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def command(argv) -> str:
    return shlex.join(["python", "jobs/translate.py", *(sys.argv[1:] if argv is None else argv)])


def run_mode(args) -> tuple[str, str]:
    """(mode, why): --ray / --no-ray as asked; without either, a Ray address (--address or
    $RAY_ADDRESS) means Ray, else "auto" (the runner times the first batch here and goes on Ray only
    above the crossover; it says which in the run's `ran`). `why` is "" where the runner says it."""
    actors = f"{args.actors} actor{'s' if args.actors > 1 else ''}"
    if args.mode == "local":
        return "local", "in-process: --no-ray"
    if args.mode == "ray":
        return "ray", f"on Ray: {actors} (--ray)"
    if args.address or os.environ.get("RAY_ADDRESS"):
        return "ray", f"on Ray: {actors} (auto: a Ray address was given; --no-ray runs in this process)"
    return "auto", ""


def report(record: dict, output: str) -> None:
    c = record["counts"]
    print(f"ran {record['ran']}; input: {record['input_half']['why'] or 'generated from z'}")
    print(f"translated {c['translated']} of {c['planned']} outputs into {storage.public_uri(output)}: "
          f"{c['done_before']} were there already; inputs rejected: {c['rejected']} now, "
          f"{c['rejected_before']} before; {c['duplicates']} duplicate inputs; "
          f"{len(c['ignored'])} other files ignored")
    for item in record["rejected"]:
        print(f"  rejected {item['input_id']}: {item['reason']}", file=sys.stderr)
    index = storage.join(storage.public_uri(output), OUTPUT_INDEX)
    print(next_step(f"look at the outputs in {storage.public_uri(output)} (lineage: {index}); rerun the "
                    "same command to translate only new inputs"))


def exit_status(record: dict, strict: bool) -> int:
    c = record["counts"]
    if strict and c["rejected"]:
        print(f"error: {c['rejected']} input(s) rejected (--strict)", file=sys.stderr)
        return cli.CHECK
    if c["planned"] and not c["translated"]:
        print("error: nothing could be translated", file=sys.stderr)
        return cli.CHECK
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    launch.quiet(args.verbose)  # telemetry (and noise) off before anything imports mlflow or ray
    return cli.run(translate, args, argv)


def translate(args, argv) -> int:
    from pipeline.registry import ModelNotFound
    from pipeline.translate import OutputError, RunOptions, Source, load_model, run

    mode, ran = run_mode(args)
    start_ray = lambda: init_ray(args.address, args.actors * args.cpus_per_actor)  # noqa: E731 (bars: -v)
    try:
        check_args(args)
        uri = launch.tracking_uri(args.tracking_uri)
        generator, info = load_model(args.model, uri, args.direction, args.size)
        if mode == "ray":  # the device is the cluster's
            start_ray()
        device = pick_device(args, mode == "ray")
        job = build_job(args, generator, info, device)
        source = Source(_absolute(args.input) if args.input else None, tuple(args.split), args.s3_endpoint)
        where = ", without Ray" if mode == "local" else ""
        print(f"model {info.name} version {info.version} ({generator.model_name}, "
              f"{generator.direction}, {generator.size}px) on {device}{where}")
        gpus = args.gpus_per_actor if device == "cuda" else 0.0
        options = RunOptions(pairs=args.pairs, overwrite=args.overwrite, mode=mode, actors=args.actors,
                             cpus_per_actor=args.cpus_per_actor, gpus_per_actor=gpus, progress=args.progress,
                             command=command(argv), commit_every_s=args.commit_every, ran=ran,
                             start_ray=start_ray)
        record = run(job, source, options)
    except (ModelNotFound, FileNotFoundError, OutputError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.USAGE
    report(record, job.output)
    return exit_status(record, args.strict)


if __name__ == "__main__":
    sys.exit(main())
