"""Ingest an image folder (local or s3://) into sharded Parquet with a manifest.

    python jobs/prepare_data.py ../shared/datasets/facades data/facades
    python jobs/prepare_data.py SRC s3://bucket/facades --s3-endpoint http://127.0.0.1:8333 --load-size 286

Each outcome has its own exit status (EXIT_CODES below, also in --help).
S3 credentials come from the AWS environment / config only; they are never printed or stored.
"""

import argparse
import logging
import shlex
import sys

from pipeline import cli, data, images, storage
from pipeline.terminal import next_step

OK, CRASH, USAGE, STORAGE, STRICT = cli.OK, cli.CRASH, cli.USAGE, cli.STORAGE, cli.CHECK  # shared by all jobs
EXIT_CODES = f"""exit status:
  {OK}  done (rejected inputs, if any, are listed in the manifest and printed)
  {CRASH}  unexpected error (a bug: the traceback says where)
  {USAGE}  bad arguments, source, layout or labels file
  {STORAGE}  storage failure (S3 error after retries, local OSError listing, reading or writing)
  {STRICT}  --strict and some input was rejected (nothing published)"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="source folder or .npz file: local path or s3://bucket/prefix")
    p.add_argument("dst", help="output folder: local path or s3://bucket/prefix")
    p.add_argument("--layout", default="auto", choices=["auto", *data.LAYOUTS])
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="only these splits (repeat or comma-separate; default all, val carved if missing)",
    )
    p.add_argument(
        "--load-size", type=int, default=None, help="resize at ingest to N x N (aligned: each half)"
    )
    p.add_argument("--shard-rows", type=int, default=data.DEFAULT_SHARD_ROWS)
    p.add_argument("--shard-mb", type=float, default=data.DEFAULT_SHARD_BYTES / 2**20)
    p.add_argument("--max-pixels", type=int, default=images.MAX_PIXELS, help="reject larger images")
    p.add_argument(
        "--min-side",
        type=int,
        default=images.MIN_SIDE,
        help="reject images with a side (aligned: of each half) below N px (default %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=data.VAL_FRACTION,
        help="share of train carved into val when the source has no val split (0: none)",
    )
    p.add_argument("--workers", type=int, default=4, help="threads decoding / reading")
    p.add_argument("--strict", action="store_true", help=f"fail (exit {STRICT}) if any input is rejected")
    p.add_argument(
        "--s3-endpoint", default=None, help="S3-compatible endpoint URL, e.g. http://127.0.0.1:8333"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.split:
        args.split = [s for chunk in args.split for s in chunk.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = data.IngestOptions(
            layout=args.layout,
            splits=args.split,
            load_size=args.load_size,
            shard_rows=args.shard_rows,
            shard_bytes=int(args.shard_mb * 2**20),
            max_pixels=args.max_pixels,
            min_side=args.min_side,
            val_fraction=args.val_fraction,
            strict=args.strict,
            workers=args.workers,
        )
        manifest = data.ingest(
            args.src,
            args.dst,
            options,
            args.s3_endpoint,
            progress=not args.no_progress,
            command=shlex.join(["python", "jobs/prepare_data.py", *argv]),
        )
    except data.StrictRejects as exc:
        print(f"error: {exc}", file=sys.stderr)
        return STRICT
    except data.IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (storage.StorageError, OSError) as exc:  # per-file read errors are rejects, not these
        print(f"error: {exc}", file=sys.stderr)
        return STORAGE
    print(summary(manifest))
    print(next_step(f"python jobs/train.py --recipe RECIPE --set data.path={storage.public_uri(args.dst)}"
                    + (f" storage.endpoint={args.s3_endpoint}" if args.s3_endpoint else "")))
    return OK


def summary(manifest: dict) -> str:
    lines = [f"layout {manifest['layout']} ({manifest['layout_reason']}), {manifest['rows']} rows:"]
    lines += [f"  {split}: {counts}" for split, counts in manifest["counts"].items()]
    lines.append(f"content hash {manifest['content_hash']}")
    if manifest["converted"]:
        lines.append(f"{len(manifest['converted'])} converted (see the manifest)")
    lines += [f"rejected {r['path']}: {r['reason']}" for r in manifest["rejected"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
