"""Models declare what they can do (ModelSpec): nothing outside models/ asks for a model by name, so
a sixth GAN is its module plus one registry line. Here a toy one, defined in this file, goes through
the plain training loop, its evaluation and a `--no-ray` translation with no other change."""

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from runs import tiny_run
from tiny import TINY
from torch import nn

from jobs import translate as translate_job
from models import MODELS, ModelSpec
from models.layers import set_requires_grad
from pipeline import checkpoint as ckpt
from pipeline.evaluation import Evaluator
from pipeline.loop import run_plain
from pipeline.translate import load_output_index

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
MODEL_NAMES = {"cyclegan", "dualgan", "bicyclegan", "cogan", "pix2pix", "toygan"}


# ============================================================================= the toy model


@dataclass
class Config:
    channels_a: int = 3
    channels_b: int = 3
    width: int = 4
    nz: int = 2
    norm: str = "none"
    lambda_l1: float = 10.0
    betas: tuple[float, float] = (0.5, 0.999)


class Generator(nn.Module):
    """x plus a small residual that sees z as constant channels: near the identity at the start,
    and one output per z (a one-way multimodal translator, BicycleGAN's shape without its encoder)."""

    def __init__(self, cfg):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cfg.channels_a + cfg.nz, cfg.width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cfg.width, cfg.channels_b, 3, padding=1))

    def forward(self, x, z):
        planes = z[:, :, None, None].to(x.dtype).expand(-1, -1, *x.shape[2:])
        return (x + self.body(torch.cat([x, planes], 1))).clamp(-1, 1)


def build_nets(cfg):
    d = nn.Sequential(nn.Conv2d(cfg.channels_b, cfg.width, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(cfg.width, 1, 4, 1, 1))
    return nn.ModuleDict({"G": Generator(cfg), "D": d})


LR = 2e-4  # the default of the run's optim.lr


def make_optimizers(cfg, nets, lr):
    return {k: torch.optim.Adam(nets[k].parameters(), lr=lr, betas=tuple(cfg.betas)) for k in ("G", "D")}


def train_step(cfg, nets, optimizers, batch, state):
    """One least-squares D update, then G: GAN + λ·L1 to the target, z ~ N(0, I)."""
    state["step"] = state.get("step", 0) + 1
    a, b = batch["a"], batch["b"]
    fake = nets["G"](a, torch.randn(len(a), cfg.nz, device=a.device))
    optimizers["D"].zero_grad(set_to_none=True)
    real, seen = nets["D"](b), nets["D"](fake.detach())
    loss_d = 0.5 * (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(seen, torch.zeros_like(seen)))
    loss_d.backward()
    optimizers["D"].step()
    set_requires_grad([nets["D"]], False)
    optimizers["G"].zero_grad(set_to_none=True)
    out = nets["D"](fake)
    loss_g = F.mse_loss(out, torch.ones_like(out)) + cfg.lambda_l1 * F.l1_loss(fake, b)
    loss_g.backward()
    optimizers["G"].step()
    set_requires_grad([nets["D"]], True)
    return {"loss/D/total": loss_d.detach(), "loss/G/total": loss_g.detach()}


@torch.no_grad()
def translate(cfg, nets, x, direction="ab", z=None):
    if z is None:
        z = torch.randn(x.shape[0], cfg.nz, device=x.device)
    return nets["G"](x, z)


TOY = ModelSpec("toygan", sys.modules[__name__], ("ab",), {"ab": "G"}, paired=True, multimodal=True)


@pytest.fixture
def toygan(monkeypatch):
    """The one registry line, for this test only."""
    monkeypatch.setitem(MODELS, "toygan", TOY)
    monkeypatch.setitem(TINY, "toygan", {})
    return TOY


# ============================================================================= tests


def test_the_five_models_declare_what_the_pipeline_used_to_ask_their_names():
    table = {name: (spec.takes_input, spec.draws_z, spec.grid_kinds, spec.metric_families)
             for name, spec in MODELS.items()}
    translation = (True, False, ("translation",), ("translation",))
    assert table == {
        "cyclegan": translation, "dualgan": translation, "pix2pix": translation,
        "bicyclegan": (True, True, ("translation", "z_samples"), ("translation", "diversity")),
        "cogan": (False, True, ("pair",), ("pairs",)),
    }
    cogan, bicyclegan = MODELS["cogan"], MODELS["bicyclegan"]
    assert cogan.latent_size(cogan.Config(nz=7)) == 7 and cogan.image_size(cogan.Config(image_size=32)) == 32
    assert bicyclegan.latent_size(bicyclegan.Config(nz=5)) == 5
    assert MODELS["pix2pix"].latent_size(MODELS["pix2pix"].Config()) is None
    assert MODELS["pix2pix"].image_size(MODELS["pix2pix"].Config()) is None


def test_a_sixth_model_trains_evaluates_and_translates_with_one_registry_line(toygan, tmp_path,
                                                                              facades_small_dst):
    cfg = tiny_run(tmp_path, facades_small_dst, "toygan", name="toy", steps=2, every=2)
    final = run_plain(cfg)
    assert final["step"] == 2
    assert {"test/l1_ab", "test/psnr_ab", "test/diversity", "baseline/l1_ab"} <= set(final)
    assert final["test/diversity"] > 0  # outputs for different z differ: z reached the generator

    folder = os.path.join(cfg.storage.path, "toy", "checkpoint_00000002")
    nets = toygan.build_nets(cfg.model)
    ckpt.load_nets(folder, nets)
    grids = Evaluator.from_config(cfg, "test").grids(nets, n=2)
    assert set(grids) == {"ab", "ab_z"}  # input | output, and input | z = 0 | random z ...

    out = tmp_path / "out"
    args = ["--model", folder, "--input", facades_small_dst, "--split", "test", "--output", out,
            "--samples", 2, "--no-ray", "--no-progress"]
    assert translate_job.main([str(a) for a in args]) == 0
    entries = list(load_output_index(str(out))["entries"].values())
    inputs = len(os.listdir(REPO / "tests" / "assets" / "facades_small" / "test"))
    assert len(entries) == 2 * inputs and {e["model_type"] for e in entries} == {"toygan"}
    assert {e["sample"] for e in entries} == {0, 1} and all(e["file"].endswith(f"_s{e['sample']}.png")
                                                            for e in entries)  # fmt: skip
    assert len({e["z_seed"] for e in entries}) == len(entries)  # a recorded z per output
    with Image.open(out / entries[0]["file"]) as img:
        assert img.mode == "RGB" and min(img.size) > 0


def model_name_comparisons(path: Path) -> list[str]:
    """`x == "cogan"`, `name in ("bicyclegan", "cogan")` and the like in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            items = side.elts if isinstance(side, (ast.Tuple, ast.Set, ast.List)) else [side]
            if any(isinstance(e, ast.Constant) and e.value in MODEL_NAMES for e in items):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_module_outside_models_branches_on_a_model_name():
    files = [p for top in ("pipeline", "jobs") for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 20  # the walk found the tree
    assert [hit for p in files for hit in model_name_comparisons(p)] == []
