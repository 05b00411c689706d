"""The model registry: every GAN behind one step contract.

`MODELS[name]` is a ModelSpec with
- `Config`: dataclass of architecture, loss weights and optimiser settings (the paper's defaults);
- `build_nets(cfg) -> nn.ModuleDict` keyed by role (`G_ab`, `G_ba`, `D_a`, `D_b`; BicycleGAN
  `G`, `E`, `D`, `D2`; CoGAN one coupled `G` and one coupled `D`);
- `LR`: the paper's learning rate, the default of a run's `optim.lr` (the one place a run sets it);
- `make_optimizers(cfg, nets, lr) -> dict[str, Optimizer]`;
- `train_step(cfg, nets, optimizers, batch, state) -> dict[str, Tensor]`: one generator update
  with the model's own discriminator updates; never changes train/eval modes, never logs, never
  does I/O; `state` is a dict the caller keeps and checkpoints (image pools, step counter). The
  losses come back as detached fp32 0-dim tensors on the nets' device (`losses.reported`), never
  read on the host: a float() or .item() here would make every GPU step wait for the host, so the
  caller reads them in batches (the loop: at log points and checkpoints);
- `batches_per_step(cfg) -> int`: how many fresh batches one `train_step` call consumes (default
  1; a module may define its own). At 1 the loop passes `batch` as one dict; at k > 1 it passes a
  list of k dicts, each drawn fresh from the data (DualGAN: critic update i sees batch i, the
  generator update the last one), and the data position advances by k per step;
- `translate(cfg, nets, x, direction="ab", z=None) -> Tensor`: inference only, no grad, no mode
  changes (CoGAN returns a generated pair);
- `directions`: the directions `translate` supports, and `generator_for` the net serving each;
- `generator_norm(cfg)`: the generator's norm kind, for its test-time mode (`models.norms`).
What a model can do, declared on its registry line so that no module outside `models/` asks for a
model by name: `generates_pairs` (draws an (a, b) pair from z and takes no input image: CoGAN) and
`multimodal` (one input, one output per latent z: BicycleGAN); from them `takes_input`, `draws_z`,
`latent_size(cfg)`, `image_size(cfg)`, `grid_kinds` and `metric_families`. Adding a GAN is its
module plus one line in MODELS.
A batch is {"a": Tensor, "b": Tensor}, N×C×H×W in [-1, 1]. `train.steps` counts `train_step`
calls (generator updates), whatever `batches_per_step` is.
"""

from dataclasses import dataclass
from types import ModuleType

from models import bicyclegan, cogan, cyclegan, dualgan, pix2pix


@dataclass(frozen=True)
class ModelSpec:
    name: str
    module: ModuleType
    directions: tuple[str, ...]
    generator_for: dict
    paired: bool  # trains on aligned pairs (True) or unpaired samples (False)
    generates_pairs: bool = False  # draws a pair (x_a, x_b) from z alone; takes no input image (CoGAN)
    multimodal: bool = False  # one input, one output per latent z; z = 0 is its mean output (BicycleGAN)

    @property
    def Config(self):  # noqa: N802 - the contract's name for the config class
        return self.module.Config

    def build_nets(self, cfg):
        return self.module.build_nets(cfg)

    @property
    def lr(self) -> float:
        """The paper's learning rate (the module's `LR`)."""
        return self.module.LR

    def make_optimizers(self, cfg, nets, lr: float | None = None):
        """The optimizers at learning rate `lr`; None = the paper's (tests and benchmarks)."""
        return self.module.make_optimizers(cfg, nets, self.lr if lr is None else lr)

    def train_step(self, cfg, nets, optimizers, batch, state):
        return self.module.train_step(cfg, nets, optimizers, batch, state)

    def batches_per_step(self, cfg) -> int:
        own = getattr(self.module, "batches_per_step", None)
        return own(cfg) if own else 1

    def translate(self, cfg, nets, x, direction="ab", z=None):
        return self.module.translate(cfg, nets, x, direction=direction, z=z)

    def generator_norm(self, cfg):
        """The image-to-image generator's norm kind (its config's `norm`), which decides its test-time
        mode (`models.norms.inference_mode`). None for a generator from z (CoGAN): it translates no
        image, and its fixed batch norms stay in eval mode."""
        return cfg.norm if self.takes_input else None

    @property
    def takes_input(self) -> bool:
        """Whether `translate` reads an image x (else x is None and z is the input, N×nz)."""
        return not self.generates_pairs

    @property
    def draws_z(self) -> bool:
        """Whether `translate` takes a latent z (N×latent_size) besides or instead of an image."""
        return self.generates_pairs or self.multimodal

    def latent_size(self, cfg) -> int | None:
        """The length of z (the config's `nz`) for a model that draws z, else None."""
        return cfg.nz if self.draws_z else None

    def image_size(self, cfg) -> int | None:
        """The one image size the nets are built for, where the architecture fixes it (its config's
        `image_size`: CoGAN's fully connected generator); None for a fully convolutional
        translator, which takes the size it was trained at and others."""
        return getattr(cfg, "image_size", None)

    @property
    def grid_kinds(self) -> tuple[str, ...]:
        """The sample grids it gets (pipeline.evaluation, Evaluator.grids): "pair" (x_a | x_b from
        one z), "translation" (input | output | reconstruction for two-way models, per direction),
        "z_samples" (input | z = 0 | random z ...)."""
        if self.generates_pairs:
            return ("pair",)
        return ("translation", "z_samples") if self.multimodal else ("translation",)

    @property
    def metric_families(self) -> tuple[str, ...]:
        """The metrics that apply (pipeline.evaluation): "pairs" (do the domain judges agree on a
        generated pair, FID per domain), "translation" (outputs against targets, labels, realism,
        cycles, FID per direction, as the data allows), "diversity" (outputs for different z)."""
        if self.generates_pairs:
            return ("pairs",)
        return ("translation", "diversity") if self.multimodal else ("translation",)


class Registry(dict):
    def __missing__(self, name):
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(self))}")


MODELS = Registry({
    "cyclegan": ModelSpec("cyclegan", cyclegan, ("ab", "ba"), {"ab": "G_ab", "ba": "G_ba"}, paired=False),
    "dualgan": ModelSpec("dualgan", dualgan, ("ab", "ba"), {"ab": "G_ab", "ba": "G_ba"}, paired=False),
    "bicyclegan": ModelSpec("bicyclegan", bicyclegan, ("ab",), {"ab": "G"}, paired=True, multimodal=True),
    "cogan": ModelSpec("cogan", cogan, ("pair",), {"pair": "G"}, paired=False, generates_pairs=True),
    "pix2pix": ModelSpec("pix2pix", pix2pix, ("ab",), {"ab": "G_ab"}, paired=True),
})

__all__ = ["MODELS", "ModelSpec"]
