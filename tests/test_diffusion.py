"""Diffusion maths: schedule, noising, training t, loss weights, the Diffusion objective (diffusers as reference)."""
from __future__ import annotations

import math

import pytest
import torch

from wurst_core.diffusion import CosineSchedule, Diffusion, diffuse, loss_weight, predict_x0, sample_t


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMWuerstchenScheduler

    return DDPMWuerstchenScheduler(scaler=1.0, s=0.008)


def test_alpha_bar_is_bit_identical_to_diffusers(scheduler):
    t = torch.cat([torch.linspace(0, 1, 1001), torch.rand(500, generator=torch.Generator().manual_seed(0))])
    ours = CosineSchedule().alpha_bar(t)
    assert torch.equal(ours, scheduler._alpha_cumprod(t, t.device))


def test_alpha_bar_shape_range_and_clamp():
    sch = CosineSchedule()
    t = torch.linspace(0, 1, 101)
    ab = sch.alpha_bar(t)
    assert ab.shape == t.shape and ab.dtype == torch.float32
    assert torch.all(ab[1:] <= ab[:-1]), "alpha_bar must decrease with t"
    assert ab[0].item() == pytest.approx(0.9999) and ab[-1].item() == pytest.approx(1e-4)
    # unclamped cosine in the middle: cos²((0.5+s)/(1+s)·π/2)/cos²(s/(1+s)·π/2)
    s = 0.008
    expect = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert sch.alpha_bar(torch.tensor(0.5)).item() == pytest.approx(expect, rel=1e-6)
    assert sch.alpha_bar(torch.tensor(0.5)).shape == ()


def test_diffuse_matches_add_noise_and_inverts(scheduler):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 16, 3, 3, generator=g), torch.randn(4, 16, 3, 3, generator=g)
    t = torch.rand(4, generator=g)
    x_t = diffuse(x0, t, noise)
    assert torch.equal(x_t, scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(predict_x0(x_t, noise, t), x0, atol=1e-4, rtol=1e-4)


def test_diffuse_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        diffuse(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="t must have shape"):
        diffuse(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 4))


def test_training_t_sampler_released_recipe():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, g)
    assert t.min().item() >= 0.001 and t.max().item() == 1.0
    # ((1-U)·1.08 + 0.001) >= 1  <=>  U <= 0.081/1.08 = 0.075: about 7.5 % of the draws land exactly on t = 1
    assert (t == 1.0).float().mean().item() == pytest.approx(0.081 / 1.08, abs=0.003)
    u = sample_t(200_000, torch.Generator().manual_seed(0), kind="uniform")
    assert (u == 1.0).float().mean().item() == pytest.approx(0.001, abs=0.0005)
    assert torch.equal(sample_t(8, torch.Generator().manual_seed(3)), sample_t(8, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="t sampler"):
        sample_t(4, kind="beta")


def test_loss_weights():
    t = torch.linspace(0, 1, 11)
    ab = CosineSchedule().alpha_bar(t)
    torch.testing.assert_close(loss_weight(t, "p2"), 1 - ab)
    # p2 with k = gamma = 1 is 1/(1+SNR)
    torch.testing.assert_close(loss_weight(t, "p2"), 1 / (1 + CosineSchedule().log_snr(t).exp()), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_weight(t, "p2_paper"), (1 - ab) / (1 + ab))
    assert torch.equal(loss_weight(t, "constant"), torch.ones(11))
    assert loss_weight(t, "p2")[-1] > loss_weight(t, "p2")[0], "noisier t must weigh more"
    with pytest.raises(ValueError, match="loss weight"):
        loss_weight(t, "snr")


def test_schedule_shift():
    base, shifted = CosineSchedule(), CosineSchedule(shift=2.0)
    t = torch.linspace(0.05, 0.95, 19)
    assert torch.equal(CosineSchedule(shift=1.0).noise_cond(t), t)
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(t) - 2 * math.log(2.0), atol=1e-5, rtol=1e-5)
    assert torch.all(shifted.alpha_bar(t) < base.alpha_bar(t)), "shift > 1 means more noise"
    # the network's r under a shift is the unshifted t with the same alpha_bar (GDF CosineTNoiseCond)
    r = shifted.noise_cond(t)
    torch.testing.assert_close(base.alpha_bar(r), shifted.alpha_bar(t), atol=2e-5, rtol=1e-4)
    # the r values of docs/reference.md#noise-shift for shift = 2
    assert shifted.noise_cond(torch.tensor([0.5, 1.0])).tolist() == pytest.approx([0.706, 0.9936], abs=1e-3)
    with pytest.raises(ValueError, match="shift"):
        CosineSchedule(shift=0.0)


def test_diffusion_loss_draw_order_and_values():
    d = Diffusion()
    x0 = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    seen = {}

    def zero_model(x_t, r, text):
        seen["r"], seen["text"] = r, text
        return torch.zeros_like(x_t)

    loss = d.loss(zero_model, x0, "txt", generator=torch.Generator().manual_seed(7))
    # same draws by hand: t first, then the noise
    g = torch.Generator().manual_seed(7)
    t = sample_t(6, g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["r"], t) and seen["text"] == "txt"
    torch.testing.assert_close(loss, (1 - CosineSchedule().alpha_bar(t)) * noise.pow(2).flatten(1).mean(1))
    assert loss.shape == (6,)


def test_diffusion_loss_is_zero_for_the_oracle_and_weight_options():
    x0 = torch.randn(3, 4, 2, 2)
    noise = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    oracle = lambda x_t, r: (x_t - CosineSchedule().alpha_bar(r).sqrt().view(-1, 1, 1, 1) * x0) / (
        1 - CosineSchedule().alpha_bar(r)).sqrt().view(-1, 1, 1, 1)
    assert Diffusion().loss(oracle, x0, t=t, noise=noise).abs().max().item() < 1e-6
    wrong = lambda x_t, r: noise + 1.0
    torch.testing.assert_close(Diffusion(weight="constant").loss(wrong, x0, t=t, noise=noise), torch.ones(3))
    with pytest.raises(ValueError, match="does not match"):
        Diffusion().loss(lambda x_t, r: x_t[:, :2], x0, t=t, noise=noise)
    with pytest.raises(ValueError, match="loss weight"):
        Diffusion(weight="foo")
