"""Training-phase helpers: image metrics and the phase parameter schemas."""
from __future__ import annotations

import math

import pytest
import torch

from wurst_core import notebook
from wurst_core.phases import StageAParams, StageBParams, StageCParams, psnr, ssim


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
@pytest.mark.parametrize("profile", notebook.PROFILES)
def test_every_profile_resolves_to_a_valid_training_config(schema, profile, monkeypatch):
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    cfg = notebook.build(schema, {"profile": profile})
    tc = cfg.train_config()
    assert tc.steps >= 1 and tc.batch_size >= 1 and cfg.size and cfg.resolution > 0
    assert math.isfinite(tc.lr) and tc.lr > 0
    if profile == "paper":  # official §6a: AdamW 1e-4, 10k warm-up, clip 1.0
        assert (tc.lr, tc.warmup_steps, tc.grad_clip) == (1e-4, 10_000, 1.0)
