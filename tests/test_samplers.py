"""Samplers: DDPM step parity with diffusers, the sampling loop (CFG, timesteps, RNG order), DDIM."""
from __future__ import annotations

import pytest
import torch

from wurst_core.diffusion import CosineSchedule, diffuse
from wurst_core.diffusion.samplers import (DEFAULT_STAGE_C_TIMESTEPS, ddim_step, ddpm_step, make_timesteps, randn,
                                 sample)


@pytest.fixture(scope="module")
def diffusers_mod():
    import diffusers
    from diffusers.pipelines.deprecated.wuerstchen import pipeline_wuerstchen_prior

    return diffusers, pipeline_wuerstchen_prior


def toy_denoiser(x, r, text=None, effnet=None):
    """A fixed, nonlinear function of every input, so that any mix-up of halves or times changes the result."""
    out = 0.3 * torch.tanh(x) + 0.1 * r.view(-1, 1, 1, 1) * x
    if text is not None:
        out = out + text.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    if effnet is not None:
        out = out + 0.05 * effnet
    return out


@pytest.mark.parametrize("timesteps", [12, "stage_c", [1.0, 0.7, 0.3, 0.05]])
def test_ddpm_step_equals_diffusers_scheduler_step(diffusers_mod, timesteps):
    diffusers, prior_mod = diffusers_mod
    sch = diffusers.DDPMWuerstchenScheduler()
    ts_arg = prior_mod.DEFAULT_STAGE_C_TIMESTEPS if timesteps == "stage_c" else timesteps
    if isinstance(ts_arg, int):
        sch.set_timesteps(ts_arg)
    else:
        sch.set_timesteps(timesteps=ts_arg)
    ours_ts = make_timesteps(DEFAULT_STAGE_C_TIMESTEPS if timesteps == "stage_c" else timesteps)
    assert torch.equal(ours_ts, sch.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for i in range(len(ours_ts) - 1):
        t = ours_ts[i].expand(3)
        ref = sch.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = ddpm_step(x, eps, t, ours_ts[i + 1].expand(3), noise)
        assert torch.equal(ours, ref), f"step {i}: max diff {(ours - ref).abs().max().item()}"


def _diffusers_loop(sch, denoise, x, ts, cond, uncond, w, g):
    """The prior pipeline's loop around the real scheduler (docs/reference.md#classifier-free-guidance)."""
    sch.set_timesteps(timesteps=ts) if not isinstance(ts, int) else sch.set_timesteps(ts)
    for t in sch.timesteps[:-1]:
        ratio = t.expand(x.size(0))
        if w > 1:
            text = torch.cat([cond, uncond])
            e_c, e_u = denoise(torch.cat([x] * 2), torch.cat([ratio] * 2), text=text).chunk(2)
            e = torch.lerp(e_u, e_c, w)
        else:
            e = denoise(x, ratio, text=cond)
        x = sch.step(e, ratio, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("timesteps,w", [(60, 4.0), ("stage_c", 4.0), (12, 0.0), ([1.0, 0.6, 0.25, 0.0], 1.5)])
def test_sample_loop_equals_diffusers_loop(diffusers_mod, timesteps, w):
    diffusers, prior_mod = diffusers_mod
    ts = DEFAULT_STAGE_C_TIMESTEPS if timesteps == "stage_c" else timesteps
    text = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    untext = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(42)
    x0 = randn((2, 16, 3, 3), g)
    ref = _diffusers_loop(diffusers.DDPMWuerstchenScheduler(), toy_denoiser, x0,
                          prior_mod.DEFAULT_STAGE_C_TIMESTEPS if timesteps == "stage_c" else ts, text, untext, w, g)
    ours = sample(toy_denoiser, (2, 16, 3, 3), ts, {"text": text}, {"text": untext}, w,
                  generator=torch.Generator().manual_seed(42))
    assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max().item()}"


def test_cfg_one_batched_forward_cond_first():
    calls = []
    cond = {"text": torch.ones(2, 3, 4), "effnet": torch.full((2, 4, 2, 2), 2.0)}
    uncond = {"text": torch.zeros(2, 3, 4), "effnet": torch.zeros(2, 4, 2, 2)}

    def spy(x, r, text, effnet):
        calls.append((x.shape[0], text[:, 0, 0].tolist(), effnet[:, 0, 0, 0].tolist(), torch.equal(x[:2], x[2:])))
        return toy_denoiser(x, r, text, effnet)

    sample(spy, (2, 4, 2, 2), 3, cond, uncond, guidance=4.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3
    assert all(c == (4, [1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], True) for c in calls)
    calls.clear()
    # w <= 1: CFG off (as diffusers), one plain batch, uncond unused
    sample(lambda x, r, text: calls.append(x.shape[0]) or toy_denoiser(x, r, text), (2, 4, 2, 2), 3,
           {"text": torch.ones(2, 3, 4)}, None, guidance=1.0)
    assert calls == [2, 2, 2]


def test_cfg_is_lerp_of_the_two_halves():
    # eps_c = 1, eps_u = 0 everywhere: the guided eps must be exactly w, visible in the first DDIM step
    def den(x, r, flag):
        return flag.view(-1, 1, 1, 1).expand_as(x).clone()

    x = torch.zeros(1, 1, 2, 2)
    out = sample(den, x, [1.0, 0.5], {"flag": torch.ones(1)}, {"flag": torch.zeros(1)}, 3.0, sampler="ddim")
    expect = ddim_step(x, torch.full_like(x, 3.0), torch.ones(1), torch.full((1,), 0.5))
    assert torch.equal(out, expect)


def test_sample_input_errors():
    with pytest.raises(ValueError, match="needs `uncond`"):
        sample(toy_denoiser, (1, 4, 2, 2), 2, {"text": torch.ones(1, 3, 4)}, None, guidance=4.0)
    with pytest.raises(ValueError, match="same keys"):
        sample(toy_denoiser, (1, 4, 2, 2), 2, {"text": torch.ones(1, 3, 4)}, {}, guidance=4.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(toy_denoiser, (1, 4, 2, 2), 2, sampler="euler")
    with pytest.raises(ValueError, match="returned shape"):
        sample(lambda x, r: x[:, :1], (1, 4, 2, 2), 2)


def test_make_timesteps_validation():
    assert torch.equal(make_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert len(DEFAULT_STAGE_C_TIMESTEPS) == 30 and DEFAULT_STAGE_C_TIMESTEPS[0] == 1.0
    assert DEFAULT_STAGE_C_TIMESTEPS[19] == pytest.approx(2 / 3) and DEFAULT_STAGE_C_TIMESTEPS[-1] == 0.0
    for bad, msg in [(0, "at least 1"), ([1.0], "at least 2"), ([0.2, 0.5], "decreasing"), ([1.5, 0.0], r"\[0, 1\]"),
                     ([1.0, 0.5, 0.5, 0.0], "decreasing")]:
        with pytest.raises(ValueError, match=msg):
            make_timesteps(bad)
    with pytest.raises(TypeError):
        make_timesteps(True)


def test_rng_draws_noise_at_every_step_including_the_last():
    g = torch.Generator().manual_seed(3)
    sample(toy_denoiser, (2, 4, 3, 3), 5, generator=g)
    ref = torch.Generator().manual_seed(3)
    for _ in range(1 + 5):  # start noise + one z per step
        torch.randn(2, 4, 3, 3, generator=ref)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=ref))


def test_seed_determinism_and_callback():
    seen = []
    a = sample(toy_denoiser, (1, 4, 3, 3), 6, generator=torch.Generator().manual_seed(0),
               callback=lambda i, t, x: seen.append((i, t.tolist(), x.clone())))
    b = sample(toy_denoiser, (1, 4, 3, 3), 6, generator=torch.Generator().manual_seed(0))
    c = sample(toy_denoiser, (1, 4, 3, 3), 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert [s[0] for s in seen] == list(range(6)) and seen[-1][1] == [0.0]
    assert torch.equal(seen[-1][2], a)


def _oracle(x0):
    sch = CosineSchedule()

    def den(x, r):
        ab = sch.alpha_bar(r).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return den


def test_ddim_with_oracle_lands_on_the_data_and_eta1_is_ddpm():
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    x_t = diffuse(x0, torch.ones(2), e)
    out = sample(_oracle(x0), x_t, 10, sampler="ddim")
    # deterministic DDIM keeps the same eps: it ends at sqrt(ab(0))·x0 + sqrt(1-ab(0))·e with ab(0) = 0.9999
    torch.testing.assert_close(out, 0.9999 ** 0.5 * x0 + 0.01 * e, atol=1e-4, rtol=1e-4)
    # DDPM with the oracle is stochastic but also ends next to the data
    ddpm = sample(_oracle(x0), x_t, 10, generator=torch.Generator().manual_seed(1))
    assert (ddpm - x0).abs().max().item() < 0.1
    # eta = 1 DDIM is the DDPM posterior: same mean and variance
    x, eps, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, tp = torch.full((2,), 0.8), torch.full((2,), 0.6)
    torch.testing.assert_close(ddim_step(x, eps, t, tp, noise, eta=1.0), ddpm_step(x, eps, t, tp, noise),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x, eps, t, tp, None, eta=0.5)


def test_randn_matches_torch_randn():
    expect = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(4)), expect)
    assert randn((2, 3)).shape == (2, 3)


def test_one_generator_per_row_makes_each_row_independent_of_its_batch():
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    rows = randn((3, 2, 2), gens(7, 8, 9))
    assert torch.equal(rows[1], torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(8))[0])
    together = sample(toy_denoiser, (2, 4, 3, 3), 5, generator=gens(1, 2))
    alone = sample(toy_denoiser, (1, 4, 3, 3), 5, generator=gens(2))
    torch.testing.assert_close(together[1:], alone)  # row 1 drew from its own generator at every step
    with pytest.raises(ValueError, match="one per batch row"):
        randn((3, 2), gens(1, 2))
