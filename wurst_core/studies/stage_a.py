"""Notebook 03: Stage A, the f4 VQGAN (reconstruction + codebook + commitment, dead-code resets)."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import params
from ..data.stream import Stream, load_images
from ..evaluation.pixels import psnr, ssim
from ..models.stage_a import STAGE_A_SIZES, StageA
from ..params import param
from ..runs import Run
from ..training import StageATask
from ..weights import save_model
from .figures import image_grid, loss_figure, save_figure
from .phases import _COMMON, PhaseParams, PhaseResult, _batched, _fit_phase, _seed_all, checkpoint_dir


@dataclass(frozen=True)
class StageAParams(PhaseParams):
    size: str = params.choice("", *STAGE_A_SIZES)
    l1_weight: float = param(0.0, ge=0)          # extra L1 reconstruction term
    reset_every: int = param(0, ge=1)            # dead-code reset period in steps (0: profile default)
    crop: int = param(0, ge=8)                   # side of the random training crops (>= resolution: whole images)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        own = {"smoke": dict(steps=3, lr=1e-3, reset_every=2, crop=64),
               # 32 px crops: a quarter of the compute per step (docs/findings.md#stage-a-crops)
               "tiny": dict(steps=1200, lr=2e-3, warmup_steps=100, reset_every=100, crop=32),
               "paper": dict(resolution=256, batch_size=256, reset_every=1000, crop=256)}[profile]
        return {**_COMMON[profile], **own}


def train_stage_a(p: StageAParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage A: the f4 VQGAN, reconstruction + codebook + 0.25 commitment, dead-code resets."""
    t0 = time.time()
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    _seed_all(p.seed)
    model = StageA(STAGE_A_SIZES[p.size])
    task = StageATask(model, l1_weight=p.l1_weight, reset_every=p.reset_every,
                      reset_until=p.steps * p.grad_accum // 2, crop=p.crop)
    history, train_seconds = _fit_phase(task, p, run, "a", train, progress)
    # unit-variance latents for Stage B; the released 0.3764 fits only its VQGAN (docs/findings.md#stage-a-scale-factor)
    calibrate_scale_factor(model, train.head(512))
    metrics = stage_a_metrics(model, val["image"])
    metrics.update(train_seconds=train_seconds, wall_seconds=time.time() - t0, steps=p.steps,
                   scale_factor=model.config.scale_factor,
                   parameters=sum(q.numel() for q in model.parameters()))
    save_model(model, checkpoint_dir(run, "stage_a"))
    with torch.no_grad():
        x = val["image"][:8]
        figs = {"reconstructions": save_figure(image_grid(
            [x, model.decode(model.encode(x)), model.decode(model.encode(x, quantize=True))],
            ["input", "unquantised", "quantised"]), run.figure("reconstructions")),
            "loss": save_figure(loss_figure(history, ("loss", "psnr", "perplexity")), run.figure("loss"))}
    return PhaseResult(history, metrics, {"stage_a": model}, figs)


@torch.no_grad()
def calibrate_scale_factor(model: StageA, images: torch.Tensor) -> float:
    """Set ``model.config.scale_factor`` to the std of the unquantised latents of ``images``, so that
    ``model.encode`` returns unit-variance latents (rounded to 4 decimals); returns it."""
    scale = round(_batched(model.encode_unscaled, images).std().item(), 4)
    model.config = dataclasses.replace(model.config, scale_factor=scale)
    return scale


@torch.no_grad()
def stage_a_metrics(model: StageA, images: torch.Tensor) -> dict[str, float]:
    rec = _batched(lambda x: model.decode(model.encode(x)), images)
    rec_q = _batched(lambda x: model.decode(model.encode(x, quantize=True)), images)
    idx = _batched(lambda x: model.quantize(model.encode_unscaled(x))[1], images)
    counts = torch.bincount(idx.flatten(), minlength=model.config.codebook_size).float()
    prob = counts / counts.sum()
    return {"psnr": psnr(rec, images).mean().item(), "psnr_quantized": psnr(rec_q, images).mean().item(),
            "ssim": ssim(rec, images).mean().item(), "ssim_quantized": ssim(rec_q, images).mean().item(),
            "codebook_perplexity": math.exp(-(prob[prob > 0] * prob[prob > 0].log()).sum().item()),
            "codebook_used": int((counts > 0).sum()), "codebook_size": model.config.codebook_size}
