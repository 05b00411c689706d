"""Ingest an image folder (local or s3://) into sharded Parquet with a manifest.

    python jobs/prepare_data.py ../shared/datasets/facades data/facades
    python jobs/prepare_data.py SRC s3://bucket/facades --s3-endpoint http://127.0.0.1:8333 --load-size 286

Exit status: 0 done (rejects, if any, are listed in the manifest and printed), 1 --strict and
something was rejected (nothing published), 2 bad arguments, source or layout, 3 storage failure.
S3 credentials come from the AWS environment / config only; they are never printed or stored.
"""

import argparse
import logging
import shlex
import sys

from pipeline import data, images, storage


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "--val-fraction",
        type=float,
        default=data.VAL_FRACTION,
        help="share of train carved into val when the source has no val split (0: none)",
    )
    p.add_argument("--workers", type=int, default=4, help="threads decoding / reading")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if any input is rejected")
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
        return 1
    except (data.IngestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except storage.StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(summary(manifest))
    return 0


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
