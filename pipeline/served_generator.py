"""One trained generator as an MLflow pyfunc model, logged "from code": nothing is unpickled.

`pipeline.tracking.log_generator` passes the PATH of this file as `python_model`; MLflow copies the
source into the model and runs it at load time (MLflow 3 refuses cloudpickled models by default).
The model's artifacts are plain data:
  "spec"    generator.json          {"model": "cyclegan", "config": {...}, "direction": "ab", "net": "G_ab"}
  "weights" generator.safetensors   the generator's state dict
The `models` package travels with the model (`code_paths`), so a bare environment with torch,
safetensors and mlflow can serve it. This file imports only `models`, never `pipeline`, because
MLflow puts the model's code folder first on sys.path and a copied `pipeline` would shadow the
caller's own.

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

import json

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file

from models import MODELS
from models.norms import inference_mode, run_generator


def build_config(spec, config: dict):
    # Model configs are flat dataclasses; JSON turned their tuples into lists.
    return spec.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def generate(spec, cfg, info: dict, net, x: torch.Tensor, z_seed: int | None = None,
             bn_mode: str = "auto") -> torch.Tensor:
    """The served output for `x` (on the net's device): the contract above, without numpy. The
    net's flags and buffers are as before afterwards."""
    nets = {info["net"]: net}
    mode = inference_mode(spec.generator_norm(cfg), bn_mode)
    if spec.generates_pairs:
        pair = lambda _, z: torch.cat(spec.translate(cfg, nets, None, "pair", z=z), dim=1)  # noqa: E731
        return run_generator(pair, net, None, x, mode)
    run = lambda xi, zi: spec.translate(cfg, nets, xi, info["direction"], zi)  # noqa: E731
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
        with open(context.artifacts["spec"]) as f:
            self.info = json.load(f)
        self.spec = MODELS[self.info["model"]]
        self.cfg = build_config(self.spec, self.info["config"])
        model_config = context.model_config or {}
        self.device = torch.device(model_config.get("device", "cpu"))
        self.bn_mode = model_config.get("bn_mode", "auto")
        inference_mode(self.spec.generator_norm(self.cfg), self.bn_mode)  # an unknown mode fails here
        net = self.spec.build_nets(self.cfg)[self.info["net"]]
        net.load_state_dict(load_file(context.artifacts["weights"]))
        self.net = net.to(self.device).eval()

    def predict(self, context, model_input: np.ndarray, params=None):  # the hint silences MLflow's nudge
        x = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32)).to(self.device)
        z_seed = (params or {}).get("z_seed")
        out = generate(self.spec, self.cfg, self.info, self.net, x, z_seed, self.bn_mode)
        return out.float().cpu().numpy()


# MLflow reads the model from this call when it runs the file; importing the module elsewhere
# (pipeline.tracking uses `generate`) only sets a global that the next load overwrites.
mlflow.models.set_model(ServedGenerator())
