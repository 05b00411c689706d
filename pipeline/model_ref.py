"""What a user may name a trained generator by, parsed in this one place (no registry call here;
`pipeline.registry.locate` asks the registry once for what a parsed reference points at).

- `models:/NAME/VERSION`, `NAME/VERSION`      a registered version          kind "version"
- `models:/NAME/latest`, `NAME`               its newest version            kind "latest"
- `models:/NAME@ALIAS`, `NAME@ALIAS`          the version an alias names    kind "alias"
- `models:/MODEL_ID`                          a logged (unregistered) model kind "logged"
- `runs:/RUN_ID/PATH`                         a model logged by a run       kind "run"
- a local folder holding generator.json       an exported generator         kind "folder"
- a checkpoint folder, or a run folder of them a training checkpoint        kind "checkpoint"
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    uri: str  # the reference in its full form: models:/..., runs:/..., or the path
    kind: str  # version | latest | alias | logged | run | folder | checkpoint
    name: str  # registered name, logged model id, run id, or the path
    ref: str = ""  # the version number, the alias, or a run's artifact path

    @property
    def registered(self) -> bool:
        return self.kind in ("version", "latest", "alias")


def parse_model_ref(ref: str) -> ModelRef:
    """`ref` as one of the forms above; ValueError for a form that is none of them."""
    if os.path.exists(ref):
        return ModelRef(ref, "checkpoint" if checkpoint_folder(ref) else "folder", ref)
    if ref.startswith(("/", ".", "~")) or os.path.isabs(ref):  # a path, never a registered name
        raise FileNotFoundError(f"model path {ref} does not exist (a model is a registered name, "
                                "models:/..., runs:/..., an exported generator or a checkpoint folder)")
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        return ModelRef(ref, "run", run_id, path)
    if "://" in ref or (":/" in ref and not ref.startswith("models:/")):
        raise ValueError(f"cannot load {ref!r}: expected models:/NAME/VERSION, models:/NAME@ALIAS, "
                         "models:/MODEL_ID, runs:/RUN_ID/PATH or a local folder")
    rest = ref.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return ModelRef(f"models:/{rest}", "alias", name, alias)
    name, sep, version = rest.partition("/")
    if not sep and ref.startswith("models:/"):
        return ModelRef(ref, "logged", name)
    version = version or "latest"
    kind = "latest" if version == "latest" else "version"
    return ModelRef(f"models:/{name}/{version}", kind, name, version)


def checkpoint_folder(path: str) -> str | None:
    """`path` when it is a checkpoint, the newest complete one when it is a run folder of them."""
    from pipeline.checkpoint import NETS, latest_local

    return path if os.path.exists(os.path.join(path, NETS)) else latest_local(path)
