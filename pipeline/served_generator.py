"""One trained generator as an MLflow pyfunc model, logged "from code": nothing is unpickled.

`pipeline.registry.ModelTracker.log_generator` passes the PATH of `served_model.py` as
`python_model` (its one line hands MLflow a `ServedGenerator`); MLflow copies that source into the
model and runs it at load time (MLflow 3 refuses cloudpickled models by default). The model's
artifacts are plain data, a `pipeline.generator_artifact` export:
  "spec"    generator.json          {"model": "cyclegan", "config": {...}, "direction": "ab", ...}
  "weights" generator.safetensors   the generator's state dict
This file, `generator_artifact.py` and the `models` package travel with the model (`code_paths`),
so a bare environment with torch, safetensors and mlflow can serve it. They import only `models`
and each other, never `pipeline` by name there, because MLflow puts the model's code folder first
on sys.path and a copied `pipeline` would shadow the caller's own.

predict(model_input) takes float32 N×C×H×W in [-1, 1] (numpy) and returns float32 N×C'×H×W in
[-1, 1], computed without gradients in the generator's test-time mode (`models.norms`): a batch-norm
generator translates each image alone, normalised by its own statistics (the pix2pix and DualGAN
test scripts), so an output never depends on the rest of the batch; every other norm runs in eval
mode. `model_config={"bn_mode": "eval"}` (or "per_image") chooses one outright.
- BicycleGAN: z = zeros (the mean output) unless params={"z_seed": int} asks for z ~ N(0, I)
  drawn from that seed;
- CoGAN generates rather than translates: model_input is z (float32 N×nz) and the output is the
  pair stacked along channels, N×(channels_a + channels_b)×H×W: [:, :channels_a] is domain a,
  [:, channels_a:] domain b.
`pyfunc.load_model(uri, model_config={"device": "cuda"})` places the net on a GPU.
"""

import os

import mlflow
import numpy as np
import torch

from models.norms import inference_mode, run_generator

try:  # logged: MLflow puts the model's code folder, this file's siblings, on sys.path
    from generator_artifact import GeneratorArtifact
except ModuleNotFoundError:  # imported from the project
    from pipeline.generator_artifact import GeneratorArtifact


def generate(artifact: GeneratorArtifact, net, x: torch.Tensor, z_seed: int | None = None,
             bn_mode: str = "auto") -> torch.Tensor:
    """The served output for `x` (on the net's device) from `artifact`'s generator `net` (built by
    `artifact.build`): the contract above, without numpy. The net's flags and buffers are as before
    afterwards."""
    spec, cfg = artifact.spec, artifact.config
    nets = {artifact.net_name: net}
    mode = inference_mode(spec.generator_norm(cfg), bn_mode)
    if spec.generates_pairs:
        pair = lambda _, z: torch.cat(spec.translate(cfg, nets, None, "pair", z=z), dim=1)  # noqa: E731
        return run_generator(pair, net, None, x, mode)
    run = lambda xi, zi: spec.translate(cfg, nets, xi, artifact.direction, zi)  # noqa: E731
    return run_generator(run, net, x, latent(spec, cfg, x, z_seed), mode)


def latent(spec, cfg, x: torch.Tensor, z_seed: int | None):
    """A multimodal model's z (BicycleGAN's): zeros by default, so that one input always gives one
    output; None for a model without one."""
    if not spec.multimodal:
        return None
    nz = spec.latent_size(cfg)
    if z_seed is None:
        return torch.zeros(x.shape[0], nz, device=x.device)
    g = torch.Generator().manual_seed(int(z_seed))
    return torch.randn(x.shape[0], nz, generator=g).to(x.device)


class ServedGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.artifact = GeneratorArtifact.load(os.path.dirname(context.artifacts["spec"]))
        model_config = context.model_config or {}
        self.device = torch.device(model_config.get("device", "cpu"))
        self.bn_mode = model_config.get("bn_mode", "auto")
        norm = self.artifact.spec.generator_norm(self.artifact.config)
        inference_mode(norm, self.bn_mode)  # an unknown mode fails here
        self.net = self.artifact.build(self.device)

    def predict(self, context, model_input: np.ndarray, params=None):  # the hint silences MLflow's nudge
        x = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32)).to(self.device)
        z_seed = (params or {}).get("z_seed")
        out = generate(self.artifact, self.net, x, z_seed, self.bn_mode)
        return out.float().cpu().numpy()
