"""Composable objective (issue 20 building blocks): training targets eps / v / x0, their conversions, the sampler
wrapper, the Stage C A/B head and its plain ablation, and the released default loss kept bit for bit."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from wurst_core.diffusion import (LOSS_WEIGHTS, TARGETS, CosineSchedule, Diffusion, diffuse, eps_denoiser, loss_weight,
                                  output_to_eps, output_to_x0, predict_x0, training_target)
from wurst_core.diffusion.samplers import ddpm_step, sample
from wurst_core.models.stage_c import STAGE_C_SIZES, StageC, ab_head

SCHEDULES = {"v2": CosineSchedule(), "shift2": CosineSchedule(shift=2.0)}


def data(seed: int = 0, b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 3, 3, generator=g), torch.randn(b, 4, 3, 3, generator=g)


def toy_model(x: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return 0.3 * torch.tanh(x) + 0.1 * r.view(-1, 1, 1, 1) * x + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("target", TARGETS)
def test_target_and_conversions_round_trip(target, schedule):
    x0, noise = data()
    t = torch.tensor([0.02, 0.25, 0.5, 0.75, 0.98])
    x_t = diffuse(x0, t, noise, schedule)
    y = training_target(x0, noise, t, target, schedule)
    torch.testing.assert_close(output_to_eps(y, x_t, t, target, schedule), noise, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(output_to_x0(y, x_t, t, target, schedule), x0, atol=2e-5, rtol=1e-5)
    d = Diffusion(schedule=schedule, target=target)  # the dataclass methods are the same functions
    assert torch.equal(d.training_target(x0, noise, t), y)
    assert torch.equal(d.to_eps(y, x_t, t), output_to_eps(y, x_t, t, target, schedule))
    assert torch.equal(d.to_x0(y, x_t, t), output_to_x0(y, x_t, t, target, schedule))


def test_target_definitions():
    x0, noise = data(1)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9, 1.0])
    ab = CosineSchedule().alpha_bar(t).double().view(-1, 1, 1, 1)
    v = ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()  # v = sqrt(ab)·eps - sqrt(1-ab)·x0
    torch.testing.assert_close(training_target(x0, noise, t, "v").double(), v, atol=1e-6, rtol=1e-6)
    assert training_target(x0, noise, t, "eps") is noise and training_target(x0, noise, t, "x0") is x0
    out = torch.randn_like(x0)
    assert output_to_eps(out, x0, t, "eps") is out and output_to_x0(out, x0, t, "x0") is out
    assert torch.equal(output_to_x0(out, x0, t, "eps"), predict_x0(x0, out, t))


def test_unknown_target_is_refused():
    x0, noise = data()
    t = torch.full((5,), 0.5)
    with pytest.raises(ValueError, match="target must be one of"):
        Diffusion(target="score")
    for fn in (lambda: training_target(x0, noise, t, "score"), lambda: output_to_eps(x0, x0, t, "score"),
               lambda: output_to_x0(x0, x0, t, "score"), lambda: eps_denoiser(toy_model, "score")):
        with pytest.raises(ValueError, match="target must be one of"):
            fn()


# ------------------------------------------------------------------------------------------ samplers


def oracle(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: str,
           schedule: CosineSchedule) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """A denoiser that knows x0 and the noise: it returns the true target (and checks it is asked about x_t)."""
    x_t = diffuse(x0, t, noise, schedule)

    def denoise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        torch.testing.assert_close(x, x_t, atol=0, rtol=0)
        torch.testing.assert_close(r, schedule.noise_cond(t), atol=0, rtol=0)
        return training_target(x0, noise, t, target, schedule)

    return x_t, denoise


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("t0", [0.3, 0.7, 1.0])
def test_a_model_that_predicts_the_true_target_denoises_exactly(target, schedule, t0):
    x0, noise = data(2)
    t = torch.full((x0.shape[0],), t0)
    x_t, denoise = oracle(x0, noise, t, target, schedule)
    wrapped = eps_denoiser(denoise, target, schedule)
    torch.testing.assert_close(wrapped(x_t, schedule.noise_cond(t)), noise, atol=1e-4, rtol=1e-4)
    out = sample(wrapped, x_t, timesteps=[t0, 0.0], sampler="ddim", schedule=schedule)
    # alpha_bar(0) is clamped to 0.9999, so "t = 0" is x0 plus 1 % of the noise: exactly diffuse(x0, 0, noise)
    torch.testing.assert_close(out, diffuse(x0, torch.zeros_like(t), noise, schedule), atol=1e-4, rtol=1e-4)
    x0_hat = output_to_x0(wrapped(x_t, schedule.noise_cond(t)), x_t, t, "eps", schedule)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)  # at t = 1 the eps -> x0 step amplifies 100x
    # DDPM (noise dropped at t_prev = 0) through the wrapper equals the step on the true noise
    ddpm = sample(wrapped, x_t, timesteps=[t0, 0.0], sampler="ddpm", schedule=schedule,
                  generator=torch.Generator().manual_seed(0))
    ref = ddpm_step(x_t, noise, t, torch.zeros_like(t), torch.zeros_like(x_t), schedule)
    torch.testing.assert_close(ddpm, ref, atol=1e-4, rtol=1e-4)


def test_eps_wrapper_is_the_denoiser_itself():
    assert eps_denoiser(toy_model) is toy_model and eps_denoiser(toy_model, "eps", SCHEDULES["shift2"]) is toy_model


@pytest.mark.parametrize("target", ["v", "x0"])
def test_guidance_commutes_with_the_conversion(target):
    # the conversion is affine in the output, so guiding eps (the sampler) = converting the guided raw output
    x, _ = data(3)
    t = torch.full((x.shape[0],), 0.6)
    out_c, out_u = torch.randn_like(x), torch.randn_like(x)
    eps_guided = torch.lerp(output_to_eps(out_u, x, t, target), output_to_eps(out_c, x, t, target), 4.0)
    torch.testing.assert_close(eps_guided, output_to_eps(torch.lerp(out_u, out_c, 4.0), x, t, target),
                               atol=1e-4, rtol=1e-4)
    text = torch.randn(x.shape[0], 2, 3, generator=torch.Generator().manual_seed(4))
    run = sample(eps_denoiser(toy_model, target), x, 3, cond={"text": text}, uncond={"text": torch.zeros_like(text)},
                 guidance=3.0, sampler="ddim")
    assert run.shape == x.shape and torch.isfinite(run).all()


# ------------------------------------------------------------------------------------------ A/B head


class FixedOutput(nn.Module):
    """Stands in for the output conv: returns a given tensor whatever the features."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.value


def test_ab_head_recovers_eps():
    x_t, eps = data(5)
    b = 0.5 * torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6))
    a = x_t - ((1 - b).abs() + 1e-5) * eps  # the A that makes the head return eps for this B
    torch.testing.assert_close(ab_head(x_t, a, b), eps, atol=1e-5, rtol=1e-5)
    # and through the network: the released head on the output conv's (A, B)
    net = StageC(STAGE_C_SIZES["parity"]).eval()
    x_t, eps = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    b = 0.5 * torch.randn(2, 16, 3, 3)
    net.out = FixedOutput(torch.cat([x_t - ((1 - b).abs() + 1e-5) * eps, b], dim=1))
    with torch.no_grad():
        torch.testing.assert_close(net(x_t, torch.full((2,), 0.5), torch.randn(2, 4, 32)), eps, atol=1e-5, rtol=1e-5)


def test_plain_head_ablation():
    cfg = STAGE_C_SIZES["parity"]
    torch.manual_seed(0)
    ab = StageC(cfg).eval()
    torch.manual_seed(0)
    plain = StageC(cfg, head="plain").eval()
    assert ab.head == "ab" and plain.head == "plain"
    assert list(ab.state_dict()) == list(plain.state_dict())  # same keys, so the same checkpoint tooling
    assert tuple(plain.out[1].weight.shape) == (cfg.c_in, cfg.c, 1, 1)  # only the output conv is narrower
    x, text = torch.randn(2, cfg.c_in, 3, 3), torch.randn(2, 4, cfg.c_cond)
    with torch.no_grad():
        # zero-initialised output conv: the A/B head returns its input (paper §3.2), the plain one predicts 0
        torch.testing.assert_close(ab(x, torch.full((2,), 0.5), text), x / (1 + 1e-5), atol=0, rtol=0)
        assert torch.equal(plain(x, torch.full((2,), 0.5), text), torch.zeros_like(x))
        eps = torch.randn_like(x)
        plain.out = FixedOutput(eps)
        assert torch.equal(plain(x, torch.full((2,), 0.5), text), eps)
    with pytest.raises(ValueError, match="head must be one of"):
        StageC(cfg, head="ba")


# ------------------------------------------------------------------------------------------ the loss


def test_default_loss_is_the_released_formula_bit_for_bit():
    x0, _ = data(7, b=8)
    text = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(8))
    assert Diffusion() == Diffusion(target="eps")
    got = Diffusion().loss(toy_model, x0, text, generator=torch.Generator().manual_seed(3))
    # the code as it was: t (stretched) then noise from one generator, p2 = 1 - alpha_bar, MSE to the noise
    g = torch.Generator().manual_seed(3)
    t = ((1 - torch.rand(8, generator=g)) * 1.08 + 0.001).clamp(0.001, 1.0)
    noise = torch.randn(x0.shape, generator=g)
    ab = CosineSchedule().alpha_bar(t)
    x_t = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * noise
    mse = (toy_model(x_t, t, text).float() - noise.float()).pow(2).flatten(1).mean(1)
    assert torch.equal(got, mse * (1 - ab))


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("target", TARGETS)
def test_loss_weights_compose_with_every_target(target, schedule):
    x0, noise = data(9)
    t = torch.tensor([0.01, 0.3, 0.5, 0.8, 1.0])
    text = torch.randn(5, 2, 3)
    plain = Diffusion(schedule=schedule, weight="constant", target=target).loss(toy_model, x0, text, t=t, noise=noise)

    def ideal(x: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return training_target(x0, noise, t, target, schedule)

    for weight in LOSS_WEIGHTS:
        d = Diffusion(schedule=schedule, weight=weight, target=target)
        assert torch.equal(d.loss(toy_model, x0, text, t=t, noise=noise), plain * loss_weight(t, weight, schedule))
        assert torch.equal(d.loss(ideal, x0, text, t=t, noise=noise), torch.zeros(5))  # the true target: no loss
        assert (d.loss(toy_model, x0, text, t=t, noise=noise) > 0).all()


def test_targets_weight_the_same_error_differently():
    # one eps estimate, expressed under each target: v-MSE = eps-MSE / ab, x0-MSE = eps-MSE · (1 - ab) / ab
    x0, noise = data(10)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    ab = CosineSchedule().alpha_bar(t)
    x_t = diffuse(x0, t, noise)
    eps_hat = noise + 0.1 * torch.randn_like(noise)
    a4, s4 = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    as_target = {"eps": eps_hat, "v": (eps_hat - s4 * x_t) / a4, "x0": (x_t - s4 * eps_hat) / a4}
    mse = {k: Diffusion(weight="constant", target=k).loss(lambda x, r, y=y: y, x0, t=t, noise=noise)
           for k, y in as_target.items()}
    torch.testing.assert_close(mse["v"], mse["eps"] / ab, rtol=1e-4, atol=0)
    torch.testing.assert_close(mse["x0"], mse["eps"] * (1 - ab) / ab, rtol=1e-4, atol=0)
