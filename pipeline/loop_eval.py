"""The loop's evaluation and logging glue: the evaluator a run builds, metrics in the served mode
(with gaps to the other modes), sample grids, and the final generators logged as models.
Evaluation draws its own randomness in a forked RNG, so it never changes what training draws.
"""

import torch

from pipeline.run_config import image_size


def rng_fork(device):
    """Evaluation draws random z and noise; a fork keeps the training RNG stream untouched, so a
    resumed run (which evaluates at other moments) ends with the same weights."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def build_evaluator(cfg, spec, model_cfg, device, split: str):
    """The loop's default evaluator factory: the run's evaluation settings over `split`."""
    from pipeline.evaluation import Evaluator

    return Evaluator.from_config(cfg, split, device, spec, model_cfg)


def evaluate(cfg, evaluator, nets, device, prefix: str) -> dict:
    """Metrics in the mode a user is served (`evaluator.mode`: per_image for a batch-norm generator,
    eval otherwise), renamed from eval/ to `prefix`/. A batch-norm generator also gets
    `<prefix>_running_stats/` (eval mode: running statistics) and `<prefix>_running_stats_gap/`
    (|per-image − running statistics|, seed 000). With eval.train_mode_too, `<prefix>_train_mode/`
    (every layer in training mode over the eval batches) and `<prefix>_gap/`, its distance from
    the eval-mode (running statistics) numbers."""
    stem = prefix.rstrip("/")
    with rng_fork(device):
        metrics = evaluator.metrics(nets)
        out = {prefix + k.removeprefix("eval/"): v for k, v in metrics.items()}
        running = metrics
        if evaluator.mode != "eval":
            running = evaluator.metrics(nets, mode="eval")
            out.update(with_gaps(running, metrics, f"{stem}_running_stats", f"{stem}_running_stats_gap"))
        if cfg.eval.train_mode_too:
            train = evaluator.metrics(nets, mode="train")  # buffers put back by models.norms.inference
            out.update(with_gaps(train, running, f"{stem}_train_mode", f"{stem}_gap"))
    return out


def eval_floors(evaluator) -> dict:
    """{"floor/eval/x": ...}: what a trivial predictor scores on the validation images for each
    eval/x that has a baseline (the evaluator computes them once)."""
    return {f"floor/eval/{k.removeprefix('baseline/')}": v for k, v in evaluator.baselines().items()
            if k.startswith("baseline/")}


def with_gaps(metrics: dict, reference: dict, name: str, gap: str) -> dict:
    """eval/x of `metrics` as `name`/x, and |reference − metrics| as `gap`/x where both have x."""
    out = {}
    for k, v in metrics.items():
        out[f"{name}/{k.removeprefix('eval/')}"] = v
        if k in reference:
            out[f"{gap}/{k.removeprefix('eval/')}"] = abs(reference[k] - v)
    return out


GRID_TILE_MIN = 128  # px: smaller tiles are enlarged (nearest) so the MLflow UI shows them at a viewable size


def log_grids(cfg, evaluator, nets, device, tracker, step: int, tag: str = "samples") -> None:
    with rng_fork(device):
        grids = evaluator.grids(nets, n=cfg.eval.grid_rows, min_side=GRID_TILE_MIN)
    for direction, grid in grids.items():
        tracker.log_image(grid, f"{tag}/step{step:07d}_{direction}.png")


def input_example(cfg, spec, model_cfg, direction: str):
    import numpy as np

    if not spec.takes_input:  # a generator from z is served z
        return np.zeros((1, spec.latent_size(model_cfg)), np.float32)
    channels = getattr(model_cfg, "channels_a" if direction == "ab" else "channels_b")
    size = image_size(cfg) or 256
    return np.zeros((1, channels, size, size), np.float32)


def trained_on_pairs(cfg) -> bool | None:
    """Whether the run's training images were aligned a|b pairs (its dataset's layout); None when
    the manifest cannot be read any more."""
    from pipeline.data import read_manifest

    try:
        return read_manifest(cfg.data.path, cfg.storage.endpoint or None).get("layout") == "aligned"
    except (OSError, ValueError, RuntimeError):  # RuntimeError: pipeline.storage.StorageError
        return None


def registered_name(cfg, direction: str) -> str:
    """The registry name of a run's generator for `direction`."""
    return f"{cfg.tracking.registered_name or cfg.recipe or cfg.model_name}-{direction}"


def register_generators(cfg, spec, model_cfg, nets, tracker, metrics: dict, step: int) -> None:
    """Log (and register) each generator with the final metrics, at the final `step`: logged at
    step 0 they would add a last value as the first point of every curve."""
    from pipeline.generator_artifact import GeneratorArtifact

    if not cfg.tracking.log_models:
        return
    aligned = trained_on_pairs(cfg)
    for direction in spec.directions:
        artifact = GeneratorArtifact.from_net(cfg.model_name, model_cfg, direction,
                                              nets[spec.generator_for[direction]], image_size(cfg),
                                              cfg.data.swap_ab, aligned)
        tracker.log_generator(
            artifact, input_example(cfg, spec, model_cfg, direction),
            registered_name=registered_name(cfg, direction) if cfg.tracking.register else None,
            metrics=metrics, step=step,
        )
