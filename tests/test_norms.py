import pytest
import torch
from torch import nn

from models.norms import BatchRenorm2d, norm_layer, renorm_limits, set_renorm_limits


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
    from pipeline.loop import renorm_at
    from pipeline.run_config import RenormSettings, make_config

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
