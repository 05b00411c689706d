import math

import pytest
import torch

from models import MODELS
from models.bicyclegan import interpolation_z
from tests.tiny import TINY, tiny_batch, tiny_model

NAMES = sorted(TINY)


def snapshot(nets):
    return {n: p.detach().clone() for n, p in nets.named_parameters()}


def test_registry_has_every_seed_model_and_names_the_valid_ones():
    assert {"cyclegan", "dualgan", "bicyclegan", "cogan"} <= set(MODELS)
    with pytest.raises(KeyError, match="valid models: bicyclegan, cogan, cyclegan, dualgan, pix2pix"):
        MODELS["cycle-gan"]


@pytest.mark.parametrize("name", NAMES)
def test_translate_shapes(name):
    spec, cfg, nets, _ = tiny_model(name)
    batch = tiny_batch(cfg, n=2)
    for direction in spec.directions:
        out = spec.translate(cfg, nets, batch["a"] if direction != "ba" else batch["b"], direction)
        if name == "cogan":
            assert [t.shape for t in out] == [(2, cfg.channels_a, 32, 32), (2, cfg.channels_b, 32, 32)]
        else:
            channels = cfg.channels_b if direction == "ab" else cfg.channels_a
            assert out.shape == (2, channels, 32, 32)
            assert out.abs().max() <= 1.0  # tanh output
            assert not out.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_one_step_changes_every_net_and_param_group(name):
    torch.manual_seed(0)
    spec, cfg, nets, optimizers = tiny_model(name)
    before = snapshot(nets)
    losses = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    after = snapshot(nets)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for role in nets:
        assert any(n.startswith(role + ".") for n in changed), f"{name}: no parameter of {role} changed"
    names_by_id = {id(p): n for n, p in nets.named_parameters()}
    for opt_name, opt in optimizers.items():
        for group in opt.param_groups:
            assert any(names_by_id[id(p)] in changed for p in group["params"]), (
                f"{name}: group of {opt_name} unchanged"
            )
    # the step contract: detached fp32 0-dim tensors, left where the nets are (no host sync)
    assert losses and all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32
                          and not v.requires_grad and math.isfinite(v) for v in losses.values())
    assert all(k.startswith("loss/") and k.count("/") >= 2 for k in losses)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_leaves_training_flags_as_found(name):
    spec, cfg, nets, optimizers = tiny_model(name)
    modules = list(nets.modules())
    for i, m in enumerate(modules):  # a mixed pattern catches both .train() and .eval() calls
        m.training = i % 3 != 0
    flags = [m.training for m in modules]
    spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    assert [m.training for m in modules] == flags


@pytest.mark.parametrize("name", ["cyclegan", "dualgan", "pix2pix"])
def test_discriminators_take_no_gradient_from_the_generator_loss(name):
    spec, cfg, nets, optimizers = tiny_model(name, **({"n_critic": 1} if name == "dualgan" else {}))
    calls = {}
    d_params = [(n, p) for n, p in nets.named_parameters() if n.startswith("D")]
    for n, p in d_params:
        p.register_hook(lambda g, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    # One backward for D's own loss; a second would mean the G loss reached D.
    assert calls and set(calls.values()) == {1}, calls


def test_cyclegan_identity_loss_switches_off_and_vanilla_gan_runs():
    spec, cfg, nets, optimizers = tiny_model("cyclegan", lambda_identity=0.0, gan_mode="vanilla")
    losses = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    assert not any("identity" in k for k in losses)
    spec, cfg, nets, optimizers = tiny_model("cyclegan")
    losses = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    assert losses["loss/G/identity_a"] > 0


def test_cyclegan_pool_is_state_the_caller_keeps():
    spec, cfg, nets, optimizers = tiny_model("cyclegan", pool_size=6)
    state = {}
    for _ in range(2):
        spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), state)
    assert state["step"] == 2 and len(state["pool_a"]) == 6 and len(state["pool_b"]) == 6
    saved = state["pool_a"].state_dict()
    assert saved["images"].shape == (6, 3, 32, 32)


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "instance", "none"])
def test_dualgan_norm_choices_train(norm):
    spec, cfg, nets, optimizers = tiny_model("dualgan", norm=norm)
    losses = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    assert math.isfinite(losses["loss/G/total"])


def test_dualgan_wgan_clips_critic_weights():
    spec, cfg, nets, optimizers = tiny_model("dualgan", loss="wgan", clip_value=0.01, lr=0.1)
    spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    for role in ("D_a", "D_b"):
        assert max(p.abs().max().item() for p in nets[role].parameters()) <= 0.01 + 1e-9


def test_dualgan_wgan_gp_critic_refuses_batch_norm_and_trains_without():
    with pytest.raises(ValueError, match="gradient penalty is per sample"):
        tiny_model("dualgan", loss="wgan-gp", critic_norm="batch")
    spec, cfg, nets, optimizers = tiny_model("dualgan", loss="wgan-gp")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nets["D_a"].modules())
    losses = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    assert losses["loss/D/gp_a"] >= 0


def test_dualgan_lsgan_and_unknown_loss():
    spec, cfg, nets, optimizers = tiny_model("dualgan", loss="lsgan")
    assert math.isfinite(spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})["loss/D/a"])
    with pytest.raises(ValueError, match="wgan, wgan-gp, lsgan"):
        tiny_model("dualgan", loss="hinge")


def test_dualgan_critic_update_i_sees_batch_i_and_the_generator_the_last():
    spec, cfg, nets, optimizers = tiny_model("dualgan", n_critic=2)
    assert spec.batches_per_step(cfg) == 2 and MODELS["cyclegan"].batches_per_step(cfg) == 1
    batches = [tiny_batch(cfg, seed=0), tiny_batch(cfg, seed=1)]
    seen = {"G_ab": [], "D_b": []}
    for name, inputs in seen.items():
        nets[name].register_forward_pre_hook(lambda m, args, inputs=inputs: inputs.append(args[0].detach()))
    spec.train_step(cfg, nets, optimizers, batches, {})
    # G_ab runs once per critic update on that update's real a, then in the generator update on
    # the generator batch's real a, then on the reconstruction path.
    a0, a1 = batches[0]["a"], batches[1]["a"]
    assert [torch.equal(x, a) for x, a in zip(seen["G_ab"][:3], (a0, a1, a1), strict=True)] == [True] * 3
    reals = [x for x in seen["D_b"] if any(torch.equal(x, b["b"]) for b in batches)]
    assert len(reals) == 2  # one real b per critic update, in order; none in the generator update
    assert torch.equal(reals[0], batches[0]["b"]) and torch.equal(reals[1], batches[1]["b"])
    with pytest.raises(ValueError, match="n_critic=2 batches per step, got 1"):
        spec.train_step(cfg, nets, optimizers, batches[:1], {})


def test_dualgan_rmsprop_starts_its_accumulator_at_one_as_tf1():
    spec, cfg, nets, optimizers = tiny_model("dualgan")
    opt = optimizers["D"]
    p = opt.param_groups[0]["params"][0]
    g = torch.full_like(p, 0.5)
    with torch.no_grad():
        p.zero_()  # so that the step is read back exactly
    p.grad = g.clone()
    opt.step()
    step = -p.detach()
    tf1 = spec.lr * g / torch.sqrt(0.9 + 0.1 * g**2)  # TF1: ms starts at 1
    torch.testing.assert_close(step, tf1, rtol=1e-5, atol=0.0)
    assert not torch.allclose(step, spec.lr * g / torch.sqrt(0.1 * g**2))  # torch's own start at 0
    # A checkpoint's optimizer state replaces the pre-filled ones
    _, _, nets2, optimizers2 = tiny_model("dualgan")
    optimizers2["D"].load_state_dict(opt.state_dict())
    loaded = optimizers2["D"].state[optimizers2["D"].param_groups[0]["params"][0]]
    torch.testing.assert_close(loaded["square_avg"], 0.9 + 0.1 * g**2)
    assert float(loaded["step"]) == 1.0


def test_bicyclegan_latent_regression_updates_g_alone():
    # Only the z term is weighted: E must not move (Adam with zero grads makes no step), G must.
    zeroed = dict(lambda_l1=0.0, lambda_kl=0.0, lambda_gan=0.0, lambda_gan2=0.0, lambda_z=0.5)
    spec, cfg, nets, optimizers = tiny_model("bicyclegan", **zeroed)
    before = snapshot(nets)
    spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), {})
    after = snapshot(nets)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("E."))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("G."))


def test_bicyclegan_z_changes_output_and_z_all_layers():
    spec, cfg, nets, _ = tiny_model("bicyclegan", z_all_layers=True)
    a = tiny_batch(cfg, n=1)["a"].expand(3, -1, -1, -1)
    z = interpolation_z(cfg.nz, 3, generator=torch.Generator().manual_seed(1))
    out = spec.translate(cfg, nets, a, "ab", z)
    assert out.shape == (3, 3, 32, 32)
    assert (out[0] - out[2]).abs().mean() > 0
    with pytest.raises(ValueError, match="batch size >= 2"):
        spec.train_step(cfg, nets, spec.make_optimizers(cfg, nets), tiny_batch(cfg, n=1), {})


def test_cogan_shares_generator_first_layers_and_discriminator_last_layers():
    _, _, nets, _ = tiny_model("cogan")
    for role in ("G", "D"):
        net = nets[role]
        ids_a = {id(p) for p in net.branch_parameters("a")}
        ids_b = {id(p) for p in net.branch_parameters("b")}
        shared = {id(p) for p in net.shared_parameters()}
        assert shared and ids_a & ids_b == shared  # the same Parameter objects in both nets
        assert ids_a - shared and ids_b - shared and not (ids_a - shared) & (ids_b - shared)
    # Topology: G shares its first (fc) layer, D shares its last (linear) layer.
    assert any(p is nets["G"].fc[0].weight for p in nets["G"].shared_parameters())
    assert any(p is nets["D"].shared[-1].weight for p in nets["D"].shared_parameters())
    assert not any(p is nets["D"].head_a[0].weight for p in nets["D"].shared_parameters())


def test_cogan_adam_carries_the_reference_weight_decay():
    _, cfg, _, optimizers = tiny_model("cogan")
    assert cfg.weight_decay == 0.0005  # mingyuliutw/CoGAN's Adam(..., weight_decay=0.0005)
    for name in ("G", "D"):
        assert [g["weight_decay"] for g in optimizers[name].param_groups] == [0.0005]


def test_cogan_updates_d_every_other_call_with_two_g_updates():
    spec, cfg, nets, optimizers = tiny_model("cogan", g_updates_per_d=2)
    state = {}
    first = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), state)
    d_before = snapshot(nets["D"])
    second = spec.train_step(cfg, nets, optimizers, tiny_batch(cfg), state)
    assert "loss/D/a" in first and "loss/D/a" not in second
    assert all(torch.equal(d_before[n], p) for n, p in nets["D"].named_parameters())


def test_cogan_28px_and_mixed_channels():
    spec, cfg, nets, optimizers = tiny_model("cogan", image_size=28, channels_b=3)
    x_a, x_b = spec.translate(cfg, nets, None)
    assert x_a.shape == (16, 1, 28, 28) and x_b.shape == (16, 3, 28, 28)
    batch = {"a": torch.rand(4, 1, 28, 28) * 2 - 1, "b": torch.rand(4, 3, 28, 28) * 2 - 1}
    assert math.isfinite(spec.train_step(cfg, nets, optimizers, batch, {})["loss/G/b"])


def test_full_size_generators_match_the_papers():
    # 256² CycleGAN ResNet-9 generator has 11.378M parameters; the 70×70 PatchGAN 2.765M
    # (the numbers pytorch-CycleGAN-and-pix2pix prints).
    spec = MODELS["cyclegan"]
    nets = spec.build_nets(spec.Config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(nets["G_ab"]) / 1e6, 3) == 11.378
    assert round(count(nets["D_a"]) / 1e6, 3) == 2.765
    unet = MODELS["pix2pix"].build_nets(MODELS["pix2pix"].Config())["G_ab"]
    assert round(count(unet) / 1e6, 3) == 54.414
