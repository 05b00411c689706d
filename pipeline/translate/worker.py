"""The worker both runners use: one batch of input rows read, decoded, translated, encoded and
written, with a lineage entry per output (or a rejection per unusable input)."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import data, images, storage
from pipeline.translate.core import Translator, decode_input, encode_output, latent
from pipeline.translate.job import FORMATS, Work, entry_key
from pipeline.translate.outputs import OUTPUT_SCHEMA
from pipeline.translate.planning import special_file


class BatchTranslator:
    """Rows of one batch -> written outputs and one lineage entry each (or a rejection per
    unreadable input). What each Ray actor holds (the generator is built once per actor) and the
    local loop's worker alike."""

    def __init__(self, work: Work):
        job = work.job
        self.work, self.job, self.lineage = work, job, work.lineage()
        self.translator = Translator(job.generator, job.device, job.settings.bn_mode, job.bf16,
                                     job.settings.dropout)
        self.pool = ThreadPoolExecutor(job.io_workers) if job.io_workers > 1 else None

    def process(self, rows: list[dict]) -> list[dict]:
        todo = [(self.work.tasks[str(r["id"])], r) for r in rows if str(r["id"]) in self.work.tasks]
        if not self.translator.spec.takes_input:  # generated from z: nothing to read
            return self._write([(task, None, k, None) for task, _ in todo for k in task.samples])
        entries, items = [], []
        for task, sha, pixels, reason in self._map(self._read, todo):
            if reason:
                entries.append({"status": "rejected", "input_id": task.id, "input_sha256": sha,
                                "reason": reason})
            else:
                items += [(task, sha, k, pixels) for k in task.samples]
        return entries + self._write(items)

    def _map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items)) if self.pool else [fn(i) for i in items]

    def _read(self, work: tuple) -> tuple:
        """(task, sha256, pixels, None), or (task, sha256, None, reason) for an unusable input."""
        task, row = work
        if "image" not in row and special_file(task.uri):
            return task, None, None, "cannot read: not a regular file (a fifo, socket or device)"
        try:
            blob = row["image"] if "image" in row else storage.read_bytes(task.uri, self.job.endpoint)
        except OSError as e:
            return task, task.sha256, None, f"cannot read: {e}"
        sha = str(row["sha256"]) if "sha256" in row else data.sha256(blob)  # a file may change after planning
        try:
            pixels = decode_input(blob, self.translator.in_channels)
        except images.Rejected as e:
            return task, sha, None, str(e)
        except (OSError, SyntaxError, ValueError) as e:  # pillow fails in Image.open on a cut header
            return task, sha, None, f"cannot decode: {e}"
        return task, sha, cut_half(pixels, self.work.half), None

    def _write(self, items: list[tuple]) -> list[dict]:
        entries = []
        for start in range(0, len(items), self.job.batch_size):
            chunk = items[start:start + self.job.batch_size]
            entries += self._store(chunk, self._translate(chunk))
        return entries

    def _translate(self, chunk: list[tuple]) -> list[tuple[np.ndarray, dict]]:
        """(output pixels, lineage) per item."""
        model, job = self.translator, self.job
        zs, lineage = [], []
        for task, sha, k, _ in chunk:
            z, seed, t = (None, None, None)
            if model.spec.draws_z:
                z, seed, t = latent(model.spec.latent_size(model.cfg), job.settings.z_mode, job.settings.seed,
                                    sha or task.id, k, job.samples)
                zs.append(z)
            lineage.append({**self.lineage, "key": entry_key(sha or task.id, k), "input_id": task.id,
                            "input_sha256": sha, "input_part": self.work.half, "sample": k, "z_seed": seed,
                            "z_t": t})
        z = torch.cat(zs) if zs else None
        if not model.spec.takes_input:
            outputs = model.generate(z)
        else:
            outputs = model.translate([p for *_, p in chunk], z, job.settings.keep_size)
        return list(zip(outputs, lineage, strict=True))

    def _store(self, chunk: list[tuple], results: list[tuple]) -> list[dict]:
        fmt = self.job.settings.format
        suffix = FORMATS[fmt]
        named = []
        for (task, *_), (pixels, lineage) in zip(chunk, results, strict=True):
            sample = f"_s{lineage['sample']}" if self.translator.spec.multimodal else ""  # one per z
            output_id = task.name + sample
            named.append((output_id, pixels, {**lineage, "name": task.name, "output_id": output_id,
                                              "file": output_id + suffix, "height": int(pixels.shape[0]),
                                              "width": int(pixels.shape[1])}))
        if fmt == "parquet":
            return self._store_shard(named)
        return self._map(self._store_file, named)

    def _store_file(self, item: tuple) -> dict:
        _, pixels, entry = item
        blob = encode_output(pixels, self.job.settings.format, entry)
        storage.write_bytes(storage.join(self.job.output, entry["file"]), blob, self.job.endpoint)
        return {**entry, "status": "ok"}

    def _store_shard(self, named: list[tuple]) -> list[dict]:
        blobs = self._map(lambda item: encode_output(item[1], "png", item[2]), named)
        rows = [{**{k: entry.get(k) for k in OUTPUT_SCHEMA.names}, "image": blob, "format": "png",
                 "channels": int(pixels.shape[2])}
                for (_, pixels, entry), blob in zip(named, blobs, strict=True)]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf, compression="none")
        shard = f"part-{data.sha256(buf.getvalue())[:16]}.parquet"
        storage.write_bytes(storage.join(self.job.output, shard), buf.getvalue(), self.job.endpoint)
        return [{**entry, "file": shard, "status": "ok"} for _, _, entry in named]


def cut_half(pixels: np.ndarray, half: str | None) -> np.ndarray:
    if half is None:
        return pixels
    middle = pixels.shape[1] // 2
    return pixels[:, :middle] if half == "left" else pixels[:, middle:]
