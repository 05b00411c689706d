import copy

import pytest
import torch
from torch import nn

from models import MODELS
from models.layers import UnetGenerator
from models.norms import (
    BatchRenorm2d,
    inference_mode,
    norm_layer,
    per_image_batch_norm,
    renorm_limits,
    run_generator,
    set_renorm_limits,
)


def batch(seed=0, shape=(8, 3, 5, 5), scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def test_equals_batchnorm_in_training_when_rmax_1_dmax_0():
    brn = BatchRenorm2d(3, momentum=0.1, rmax=1.0, dmax=0.0)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        brn.running_mean.fill_(4.0)  # far from the batch: r and d would be large if not clipped
        brn.running_var.fill_(9.0)
        bn.running_mean.fill_(4.0)
        bn.running_var.fill_(9.0)
        for m in (brn, bn):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for seed in range(3):
        x = batch(seed)
        torch.testing.assert_close(brn(x), bn(x))
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)


def test_eval_uses_running_statistics():
    brn = BatchRenorm2d(3)
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        brn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        brn.weight.copy_(torch.tensor([2.0, 1.0, 0.5]))
    brn.eval()
    x = batch()
    mean = brn.running_mean[None, :, None, None]
    std = torch.sqrt(brn.running_var + brn.eps)[None, :, None, None]
    expected = (x - mean) / std * brn.weight[None, :, None, None]
    torch.testing.assert_close(brn(x), expected)
    # and eval mode leaves the running statistics alone
    assert torch.equal(brn.running_mean, torch.tensor([1.0, -1.0, 0.5]))


def test_r_and_d_are_clipped():
    brn = BatchRenorm2d(3, rmax=2.0, dmax=0.5, momentum=0.0)
    with torch.no_grad():
        brn.running_var.fill_(100.0)  # σ = 10, batch σ_B ≈ 2, so σ_B/σ = 0.2 → r clips to 1/2
        brn.running_mean.fill_(-50.0)  # (μ_B − μ)/σ ≈ 5.1 → d clips to 0.5
    x = batch()
    mean_b = x.mean(dim=(0, 2, 3))[None, :, None, None]
    std_b = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + brn.eps)[None, :, None, None]
    expected = (x - mean_b) / std_b * 0.5 + 0.5
    torch.testing.assert_close(brn(x), expected)
    with torch.no_grad():
        brn.running_var.fill_(1e-4)  # now σ_B/σ is huge → r clips to rmax; d to −dmax
        brn.running_mean.fill_(50.0)
    torch.testing.assert_close(brn(x), (x - mean_b) / std_b * 2.0 - 0.5)


def test_gradients_match_finite_differences_with_r_and_d_at_their_clip_bounds():
    brn = BatchRenorm2d(2, rmax=1.5, dmax=0.3, momentum=0.0).double()
    with torch.no_grad():
        brn.running_var.fill_(400.0)
        brn.running_mean.fill_(30.0)
        brn.weight.copy_(torch.tensor([1.3, 0.7], dtype=torch.float64))
    x = batch(shape=(4, 2, 3, 3)).double().requires_grad_(True)
    # Held at their bounds, r and d are constants, so finite differences see the same function
    # that autograd differentiates (no gradient through r and d).
    assert torch.autograd.gradcheck(brn, (x,), eps=1e-6, atol=1e-5)


def test_gradient_treats_r_and_d_as_constants():
    # Inside the clip range r, d depend on the batch; the gradient must still ignore that path.
    brn = BatchRenorm2d(2, rmax=100.0, dmax=100.0, momentum=0.0).double()
    with torch.no_grad():
        brn.running_var.fill_(2.0)
        brn.running_mean.fill_(0.5)
    x = batch(shape=(4, 2, 3, 3)).double().requires_grad_(True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    (brn(x) * w).sum().backward()
    mean_b = x.detach().mean(dim=(0, 2, 3))
    std_b = torch.sqrt(x.detach().var(dim=(0, 2, 3), unbiased=False) + brn.eps)
    running_std = torch.sqrt(brn.running_var + brn.eps)
    r = (std_b / running_std)[None, :, None, None]
    d = ((mean_b - brn.running_mean) / running_std)[None, :, None, None]
    x2 = x.detach().clone().requires_grad_(True)
    x_hat = (x2 - x2.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        x2.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + brn.eps)
    ((x_hat * r + d) * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_statistics_in_fp32_under_autocast():
    brn = BatchRenorm2d(3)
    x = (batch() * 1000).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = brn(x)
    assert y.dtype == torch.bfloat16
    assert brn.running_mean.dtype == torch.float32 and torch.isfinite(brn.running_var).all()
    ref = BatchRenorm2d(3)(x.float())
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_limits_are_buffers_the_loop_can_anneal():
    net = nn.Sequential(BatchRenorm2d(3), nn.ReLU(), BatchRenorm2d(3))
    assert set_renorm_limits(net, rmax=1.5, dmax=0.5) == 2
    state = net.state_dict()
    assert float(state["0.rmax"]) == 1.5 and float(state["2.dmax"]) == 0.5
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        set_renorm_limits(net, rmax=0.5)


def test_warmup_has_the_papers_shape_at_its_key_points():
    """Ioffe 2017: batch norm until 5k steps, dmax reaches 5 at 25k, rmax reaches 3 at 40k."""
    at = lambda step: renorm_limits(step, 5_000, 40_000, 25_000, 3.0, 5.0)  # noqa: E731
    assert at(0) == (1.0, 0.0) and at(4_999) == (1.0, 0.0) and at(5_000) == (1.0, 0.0)
    assert at(15_000) == pytest.approx((1.0 + 2.0 * 10 / 35, 2.5))  # dmax halfway, rmax not yet
    assert at(25_000) == pytest.approx((1.0 + 2.0 * 20 / 35, 5.0))
    assert at(40_000) == (3.0, 5.0) and at(90_000) == (3.0, 5.0)
    assert renorm_limits(0, 0, 0, 0, 2.0, 1.0) == (2.0, 1.0)  # no warm-up: the final limits at once


def test_loop_warmup_is_on_by_default_as_fractions_of_the_run():
    from pipeline.run_config import RenormSettings, make_config
    from pipeline.trainee import renorm_at

    cfg = make_config("dualgan")
    steps = cfg.train.steps
    assert renorm_at(cfg.renorm, 0, steps) == (1.0, 0.0)
    assert renorm_at(cfg.renorm, int(0.05 * steps), steps) == (1.0, 0.0)
    assert renorm_at(cfg.renorm, int(0.25 * steps), steps)[1] == 5.0
    assert renorm_at(cfg.renorm, int(0.40 * steps), steps) == (3.0, 5.0)
    assert 1.0 < renorm_at(cfg.renorm, int(0.25 * steps), steps)[0] < 3.0
    # warmup_steps > 0: rmax ends there, batch norm until 5/40 and dmax's end at 25/40 of it
    fixed = RenormSettings(warmup_steps=400)
    assert renorm_at(fixed, 50, 10**6) == (1.0, 0.0) and renorm_at(fixed, 51, 10**6)[1] > 0.0
    assert renorm_at(fixed, 250, 10**6)[1] == 5.0 and renorm_at(fixed, 400, 10**6) == (3.0, 5.0)
    off = RenormSettings(bn_until=0.0, rmax_until=0.0, dmax_until=0.0)
    assert renorm_at(off, 0, steps) == (3.0, 5.0)


def test_norm_layer_by_name():
    assert isinstance(norm_layer("batch", 4), nn.BatchNorm2d)
    assert isinstance(norm_layer("batch_renorm", 4), BatchRenorm2d)
    inst = norm_layer("instance", 4)
    assert isinstance(inst, nn.InstanceNorm2d) and not inst.track_running_stats
    assert isinstance(norm_layer("none", 4), nn.Identity)
    with pytest.raises(ValueError, match="batch, batch_renorm, instance, none"):
        norm_layer("group", 4)


# ----------------------------------------------------------------------------- inference modes


def unet(norm="batch", num_downs=5, dropout=False):
    """A tiny U-Net whose running statistics have moved away from their initial 0 and 1."""
    torch.manual_seed(0)
    net = UnetGenerator((3, 3), num_downs=num_downs, ngf=4, norm=norm, use_dropout=dropout)
    with torch.no_grad():
        net.train()(batch(9, (4, 3, 2**num_downs, 2**num_downs)))
    return net


def apply(net):
    return lambda x, z: net(x)


def test_per_image_output_does_not_depend_on_the_batch():
    net, x = unet(), batch(1, (4, 3, 32, 32))
    together = run_generator(apply(net), net, x, mode="per_image")
    alone = run_generator(apply(net), net, x[2:3], mode="per_image")
    others = run_generator(apply(net), net, torch.cat([x[2:3], batch(5, (3, 3, 32, 32))]), mode="per_image")
    assert torch.equal(together[2:3], alone) and torch.equal(others[:1], alone)
    # it is batch norm in training mode on the image alone (the papers' test scripts at batch 1) ...
    reference = copy.deepcopy(net).train()
    with torch.no_grad():
        torch.testing.assert_close(alone, reference(x[2:3]))
    # ... which neither running statistics nor the statistics of the whole batch give
    assert (together - run_generator(apply(net), net, x, mode="eval")).abs().mean() > 1e-3
    assert (together - run_generator(apply(net), net, x, mode="train")).abs().mean() > 1e-3


def test_per_image_inference_leaves_buffers_and_flags_as_found():
    net, x = unet(), batch(1, (3, 3, 32, 32))
    net.eval()
    net.up[1].train()  # a mixed pattern: each flag must come back, not one for all
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for mode in ("per_image", "train"):
        run_generator(apply(net), net, x, mode=mode)
        with per_image_batch_norm(net):
            assert all(m.training and not m.track_running_stats
                       for m in net.modules() if isinstance(m, nn.BatchNorm2d))
            net(x)
        assert [(m.training, getattr(m, "track_running_stats", None)) for m in net.modules()] == flags
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), mode
    assert any("num_batches_tracked" in k for k in before)


def test_dropout_is_off_at_test_unless_asked():
    net, x = unet(num_downs=6, dropout=True), batch(1, (2, 3, 64, 64))
    assert any(isinstance(m, nn.Dropout) for m in net.modules())
    first, second = (run_generator(apply(net), net, x, mode="per_image") for _ in range(2))
    assert torch.equal(first, second)
    torch.manual_seed(1)
    noisy = run_generator(apply(net), net, x, mode="per_image", dropout=True)
    assert (noisy - first).abs().mean() > 1e-3  # pix2pix's test-time dropout
    assert all(m.training for m in net.modules())  # unet() left it in train mode


def test_auto_is_per_image_for_batch_norm_only():
    assert inference_mode("batch") == "per_image"
    assert [inference_mode(k) for k in ("batch_renorm", "instance", "none", None)] == ["eval"] * 4
    assert inference_mode("batch", "eval") == "eval" and inference_mode("instance", "train") == "train"
    with pytest.raises(ValueError, match="per_image"):
        inference_mode("batch", "sample")
    x = batch(1, (3, 3, 32, 32))
    for norm in ("batch_renorm", "instance"):
        net = unet(norm)
        out = run_generator(apply(net), net, x, mode=inference_mode(norm))
        with torch.no_grad():
            assert torch.equal(out, copy.deepcopy(net).eval()(x)), norm
    # CoGAN generates from z: not an image-to-image generator, so none of its norms is per image
    cogan = MODELS["cogan"]
    assert cogan.generator_norm(cogan.Config()) is None
    dualgan = MODELS["dualgan"]
    assert dualgan.generator_norm(dualgan.Config(norm="batch")) == "batch"
