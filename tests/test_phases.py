"""Training-phase helpers: image metrics and the phase parameter schemas."""
from __future__ import annotations

import math

import pytest
import torch

from wurst_core import params
from wurst_core.evaluation.pixels import psnr, ssim
from wurst_core.studies.stage_a import StageAParams
from wurst_core.studies.stage_b import StageBParams
from wurst_core.studies.stage_c import StageCParams


def test_psnr_of_known_error():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a + 0.1
    assert psnr(b, a) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)  # mse 0.01 -> 20 dB


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim(x, x) == pytest.approx(torch.ones(2), abs=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(noisy, x) < 0.9).all()
    assert (ssim(noisy, x) > ssim(torch.rand(2, 3, 32, 32, generator=g), x)).all()


@pytest.mark.parametrize("schema", [StageAParams, StageBParams, StageCParams])
@pytest.mark.parametrize("profile", params.PROFILES)
def test_every_profile_resolves_to_a_valid_training_config(schema, profile, monkeypatch):
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    cfg = params.build(schema, {"profile": profile})
    tc = cfg.train_config()
    assert tc.steps >= 1 and tc.batch_size >= 1 and cfg.size and cfg.resolution > 0
    assert math.isfinite(tc.lr) and tc.lr > 0
    if profile == "paper":  # docs/reference.md#training-recipe: AdamW 1e-4, 10k warm-up, clip 1.0
        assert (tc.lr, tc.warmup_steps, tc.grad_clip) == (1e-4, 10_000, 1.0)


def test_paper_profile_builds_the_released_sizes_on_the_meta_device(monkeypatch):
    """The `paper` profile is not trained here; its networks are built without memory and counted."""
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    from wurst_core.models.semantic import SEMANTIC_SIZES, SemanticCompressor
    from wurst_core.models.stage_a import STAGE_A_SIZES, StageA
    from wurst_core.models.stage_b import STAGE_B_SIZES, StageB
    from wurst_core.models.stage_c import STAGE_C_SIZES, StageC

    a = params.build(StageAParams, {"profile": "paper"})
    b = params.build(StageBParams, {"profile": "paper"})
    c = params.build(StageCParams, {"profile": "paper"})
    with torch.device("meta"):
        nets = {"a": StageA(STAGE_A_SIZES[a.size]), "sc": SemanticCompressor(SEMANTIC_SIZES[b.compressor]),
                "b": StageB(STAGE_B_SIZES[b.size]), "c": StageC(STAGE_C_SIZES[c.size])}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    assert counts == {"a": 18_406_894, "sc": 20_198_000, "b": 1_055_365_280, "c": 993_636_896}
    assert c.latent_scaling == "v2" and b.sc_size == 768 and c.train_config().batch_size == 1280


def test_stream_renders_the_dataset_items_on_demand():
    from wurst_core.data import make_dataset
    from wurst_core.data.stream import Stream

    stream = Stream("procedural", 10**6, 32, seed=3)
    assert len(stream) == 10**6
    batch = stream([5, 999_999, 5])
    ds = make_dataset("procedural", size=10**6, resolution=32, seed=3, split="train")
    assert batch["image"].shape == (3, 3, 32, 32)
    assert torch.equal(batch["image"][0], ds[5]["image"]) and torch.equal(batch["image"][0], batch["image"][2])
    assert batch["caption"][1] == ds[999_999]["caption"]


def test_calibrated_scale_factor_gives_unit_variance_latents():
    from wurst_core.models.stage_a import STAGE_A_SIZES, StageA
    from wurst_core.studies.stage_a import calibrate_scale_factor

    torch.manual_seed(0)
    model = StageA(STAGE_A_SIZES["parity"]).eval()
    images = torch.rand(6, 3, 32, 32)
    assert abs(model.encode(images).std().item() - 1) > 0.05  # the released 0.3764 does not fit random weights
    scale = calibrate_scale_factor(model, images)
    assert model.config.scale_factor == scale
    assert model.encode(images).std().item() == pytest.approx(1.0, abs=1e-3)
    undone = model.out_block(model.up_blocks(model.encode_unscaled(images)))
    assert torch.allclose(model.decode(model.encode(images)), undone, atol=1e-5)  # decode undoes the scale


def test_stage_c_objective_is_the_released_one_except_the_tiny_noise_shift(monkeypatch):
    from wurst_core.diffusion import Diffusion

    monkeypatch.delenv("WURST_PROFILE", raising=False)
    assert params.build(StageCParams, {"profile": "paper"}).diffusion() == Diffusion()  # p2, stretched t, no shift
    assert params.build(StageCParams, {"profile": "smoke"}).diffusion() == Diffusion()
    tiny = params.build(StageCParams, {"profile": "tiny"}).diffusion()
    assert (tiny.weight, tiny.t_sampler, tiny.schedule.shift) == ("p2", "uniform", 2.0)
    g = torch.Generator().manual_seed(0)
    released = Diffusion()
    ab_tiny = tiny.schedule.alpha_bar(tiny.sample_t(20_000, g)).mean()
    ab_released = released.schedule.alpha_bar(released.sample_t(20_000, g)).mean()
    assert ab_tiny < ab_released - 0.05, "the shifted objective trains at more noise"
    with pytest.raises(params.ParameterError, match="'t_sampler' must be one of"):  # refused at resolve time
        params.build(StageCParams, {"profile": "tiny", "t_sampler": "logit"})
    with pytest.raises(params.ParameterError, match="'noise_shift' must lie in"):
        params.build(StageCParams, {"profile": "tiny", "noise_shift": -1.0})


def test_stage_b_guidance_is_the_released_zero_on_paper_and_an_explicit_zero_is_kept(monkeypatch):
    """`decoder_guidance: float | None`: None takes the profile's value; 0 (no guidance) is a value, not "unset"."""
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    assert params.build(StageBParams, {"profile": "paper"}).decoder_guidance == 0.0
    assert params.build(StageBParams, {"profile": "tiny"}).decoder_guidance == 2.0
    assert params.build(StageBParams, {"profile": "tiny", "decoder_guidance": 0.0}).decoder_guidance == 0.0
    assert params.build(StageBParams, {"profile": "tiny", "decoder_guidance": 3}).decoder_guidance == 3.0
    assert params.build(StageBParams, {"profile": "tiny", "steps": 0}).steps == 1700  # plain fields: 0 is unset
    assert params.build(StageCParams, {"profile": "tiny"}).workers == 2
    assert params.build(StageCParams, {"profile": "paper"}).workers == 1
