"""Notebook 04: Stage B with the Semantic Compressor trained jointly (paper section 3.1)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import params
from ..data.stream import Stream, load_images
from ..evaluation.pixels import psnr, ssim
from ..models.semantic import (SEMANTIC_SIZES, LatentScaling, SemanticCompressor, SemanticCompressorConfig, preprocess,
                               tiny_backbone_widths)
from ..models.stage_b import STAGE_B_SIZES, StageB
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from ..training import StageBTask, TextCache, freeze
from ..weights import load_model, save_model
from .figures import image_grid, loss_figure, save_figure
from .phases import (_COMMON, PhaseParams, PhaseResult, _batched, _fit_phase, _seed_all, checkpoint_dir, load_stage,
                     text_encoder)


@dataclass(frozen=True)
class StageBParams(PhaseParams):
    size: str = params.choice("", *STAGE_B_SIZES)
    compressor: str = params.choice("", *SEMANTIC_SIZES)  # tiny: a small CNN; paper: EfficientNetV2-S
    compressor_weights: str = ""    # optional local file with ImageNet (or released) compressor weights
    compressor_stages: int = param(0, ge=0, le=8)  # tiny backbone: stride-2 stages, 3: 64 px -> 8 x 8 (0: its own)
    sc_size: int = param(0, ge=8, le=4096)   # compressor input size (docs/reference.md#compressor-input-size)
    p_drop_sc: float = param(0.05, ge=0, le=1)   # released: 5 % dropped (docs/reference.md#conditioning-dropout)
    p_noise_sc: float = param(0.3, ge=0, le=1)   # ... 30 % noised with t ~ U(0, 0.5)
    p_drop_text: float = param(0.05, ge=0, le=1)
    sample_steps: int = param(0, ge=1, le=1000)  # Stage B sampling steps for the reconstructions (paper: tau_B = 12)
    decoder_guidance: float | None = param(None, ge=0)  # Stage B guidance of the reconstructions and pipeline

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        own = {"smoke": dict(steps=3, lr=1e-3, compressor="tiny", sc_size=64, sample_steps=2, decoder_guidance=2.0),
               # 4 x 4 maps (16:1) and 1700 steps fit the CPU budget (docs/findings.md#tiny-profile-scale-and-budget)
               # guidance 2 keeps the small objects an unguided tiny Stage B drops (docs/findings.md#guidance-stage-b)
               "tiny": dict(steps=1700, lr=1e-3, warmup_steps=100, compressor="tiny", compressor_stages=4, sc_size=64,
                            sample_steps=12, decoder_guidance=2.0),
               "paper": dict(compressor="paper", sc_size=768, sample_steps=12, decoder_guidance=0.0)}[profile]
        return {**_COMMON[profile], **own}


def _stage_b_config(p: StageBParams, text_width: int):
    return dataclasses.replace(STAGE_B_SIZES[p.size], clip_embd=text_width)


def train_stage_b(p: StageBParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage B with the Semantic Compressor trained jointly (paper §3.1)."""
    t0 = time.time()
    stage_a = freeze(load_stage("a", p.profile))
    text = TextCache(text_encoder(p.profile))
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    _seed_all(p.seed)
    comp_cfg: SemanticCompressorConfig = dataclasses.replace(SEMANTIC_SIZES[p.compressor], image_size=p.sc_size)
    if comp_cfg.backbone == "tiny" and p.compressor_stages:
        comp_cfg = dataclasses.replace(comp_cfg, tiny_widths=tiny_backbone_widths(p.compressor_stages))
    compressor = SemanticCompressor(comp_cfg)
    if p.compressor_weights:
        loaded = load_model(p.compressor_weights, "semantic")
        compressor.load_state_dict(loaded.state_dict())
    stage_b = StageB(_stage_b_config(p, text.encoder.width))
    task = StageBTask(stage_b, stage_a, compressor, text, sc_size=p.sc_size, p_drop_sc=p.p_drop_sc,
                      p_noise_sc=p.p_noise_sc, p_drop_text=p.p_drop_text)
    history, train_seconds = _fit_phase(task, p, run, "b", train, progress)
    pipe = Pipeline.from_networks(stage_c=None, stage_b=stage_b, stage_a=stage_a, text=text.encoder,
                                  compressor=compressor, resolution=p.resolution, scaling=LatentScaling("none"))

    def reconstruct(guidance: float) -> torch.Tensor:
        return torch.cat([pipe.reconstruct(val["image"][i:i + 64], val["caption"][i:i + 64],
                                           decoder_steps=p.sample_steps, decoder_guidance=guidance,
                                           generator=torch.Generator().manual_seed(p.seed + i))
                          for i in range(0, len(val["caption"]), 64)])

    plain = reconstruct(0.0)
    recon = reconstruct(p.decoder_guidance) if p.decoder_guidance else plain
    n_fig = min(8, len(recon))
    metrics = {"reconstruction_psnr": psnr(recon, val["image"]).mean().item(),
               "reconstruction_ssim": ssim(recon, val["image"]).mean().item(),
               "decoder_guidance": p.decoder_guidance,
               "reconstruction_psnr_unguided": psnr(plain, val["image"]).mean().item(),
               "stage_a_ceiling_psnr": psnr(_batched(lambda x: stage_a.decode(stage_a.encode(x)), val["image"]),
                                            val["image"]).mean().item(),
               "sc_latent_shape": list(task.compressor(preprocess(val["image"][:1], p.sc_size)).shape[1:]),
               "train_seconds": train_seconds, "wall_seconds": time.time() - t0, "steps": p.steps,
               "parameters_stage_b": sum(q.numel() for q in stage_b.parameters()),
               "parameters_compressor": sum(q.numel() for q in compressor.parameters())}
    save_model(stage_b, checkpoint_dir(run, "stage_b"), sampling={"guidance": p.decoder_guidance or 0.0})
    save_model(compressor, checkpoint_dir(run, "semantic"))
    rows, titles = [val["image"][:n_fig], plain[:n_fig]], ["input", "A(B(sc)), no guidance"]
    if p.decoder_guidance:
        rows, titles = rows + [recon[:n_fig]], titles + [f"guidance {p.decoder_guidance:g}"]
    figs = {"reconstructions": save_figure(image_grid(rows, titles, val["caption"][:n_fig]),
                                           run.figure("reconstructions")),
            "loss": save_figure(loss_figure(history), run.figure("loss"))}
    return PhaseResult(history, metrics, {"stage_b": stage_b, "semantic": compressor}, figs)
