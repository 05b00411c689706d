"""Batch translation: one trained generator over many images, incremental, with lineage per output.

Three layers, so that the core also runs where Ray does not (a bare GPU box, the benchmark):

- the plain-torch core: `model.load_model` (driver side: a registered model, a run's model or a
  training checkpoint -> its `GeneratorArtifact`, config, training image size and weights, and
  its `ModelInfo`, the lineage) and
  `core.Translator` (holds the net once; resizes a batch of decoded images to the model's size and
  channels, translates in the inference mode `bn_mode` asks for, and brings each output back to
  its input's size). bn_mode "auto" (the default) follows the papers' test scripts: a batch-norm
  generator translates each image alone, normalised by its own statistics, so an output never
  depends on the rest of its batch; any other norm runs in eval mode. "per_image", "eval"
  (running statistics) and "train" (batch statistics over the batch, dropout on; flags and
  buffers restored) choose one outright (`models.norms`);
- the job: `job.Job` is what the caller asks for; `planning.resolve` completes it from the input
  (an aligned dataset adds the half the model reads) into a frozen `job.Work` whose key is final
  before the output folder is opened; `planning.plan` lists the inputs (a Parquet dataset made by
  prepare_data.py, or a folder of images read as ingest would read them; local or s3://), hashes
  them and keeps only the (input, sample) pairs the output index does not list yet;
  `worker.BatchTranslator` reads, decodes, translates, encodes and writes one batch and returns a
  lineage entry per output; `runner.run` feeds it in this process or to a pool of Ray actors
  (`ray_runner`: one generator per actor), chosen by the count of images against Ray's start-up
  unless forced (`RunOptions.mode`), and commits the output index after each block;
- the output folder (`outputs.Outputs`): PNG or JPEG files named after their inputs (subfolders
  kept; BicycleGAN adds `_s<k>` per sample, CoGAN writes `pair-NNNNNN` with a|b side by side), or
  Parquet shards, and the output index `_manifest.json` (named apart from a dataset's manifest in
  the code; the file keeps its name for existing folders), which maps "<input sha256>/<sample>"
  to the output and its lineage (model name, version, run id, input id and sha256, direction,
  z seed, sample).

Why a rerun is safe: every output is written atomically (temp name then rename; an S3 object
appears whole) and enters the output index only once it exists; the index is replaced
atomically too. Each run first makes the folder agree with its output index: entries made by another model
version or other settings are dropped (that model's outputs are redone), and files the output index
does not list (what a killed run wrote after its last commit) are removed. So a killed run leaves
only complete files, the rerun redoes exactly what is unlisted, and every listed (input, sample)
has exactly one output. Inputs that cannot be decoded are listed under "rejected" by sha256 and
not tried again until their content changes; inputs that cannot be read at all are listed by path
(`outputs.unreadable_key`) and tried again once they can be read. Two runs must not write one
folder at once: the schedules in infra/ avoid overlaps, and a run stops if a later run has claimed
its folder.

The names callers use are importable from here.
"""

from pipeline.generator_artifact import GeneratorArtifact
from pipeline.translate.core import BN_MODES, Translator, decode_input, encode_output, latent, z_seed
from pipeline.translate.job import FORMATS, Z_MODES, Job, RunOptions, Settings, Task, Work
from pipeline.translate.model import ModelInfo, load_model, weights_key
from pipeline.translate.outputs import (
    KIND,
    OUTPUT_INDEX,
    RUN_FILE,
    OutputError,
    Outputs,
    load_output_index,
    read_parquet_outputs,
)
from pipeline.translate.planning import Plan, Source, plan, resolve
from pipeline.translate.runner import run
from pipeline.translate.worker import BatchTranslator

__all__ = [
    "BN_MODES", "FORMATS", "KIND", "OUTPUT_INDEX", "RUN_FILE", "Z_MODES", "BatchTranslator",
    "GeneratorArtifact", "Job", "ModelInfo", "OutputError", "Outputs", "Plan", "RunOptions", "Settings",
    "Source", "Task", "Translator", "Work", "decode_input", "encode_output", "latent", "load_output_index",
    "load_model", "plan", "read_parquet_outputs", "resolve", "run", "weights_key", "z_seed",
]
