"""Notebook 13: train the Previewer (``models.previewer``), a small decoder from Stage C latents to a low-resolution
image, and watch Stage C sample through it.

It learns from the images behind the frozen Semantic Compressor's latents (``training.previewer.PreviewerTask``:
MSE against the images downsampled to its output size), through ``training.fit_processes`` like every stage, so a
killed run resumes exactly. Reported: PSNR on held-out images against the downsampled originals, beside two
references at the same size (the mean training image, a floor; Stage B + Stage A decoding the same latents, the
full decoder) and the milliseconds per image of each; a grid; and the previews of Stage C's predictions while it
samples (``Pipeline(..., previewer=...)``, ``pipe(prompts, preview=callback, preview_every=k)``).

Cost on the ``tiny`` profile, estimated as for ``12_finetune`` (tiny-size networks with random weights timed on
this machine under load, scaled by the committed ``05_stage_c`` step): a Previewer step of batch 64 costs 0.4
Stage C steps, so 1,500 steps with two workers take ~1.1 min; the references (Stage B + A on 128 images), grids
and previews ~0.3 min, loading ~0.2 min: about 1.6 minutes.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import params
from ..data import MAX_PIXELS
from ..data.stream import Stream, load_images
from ..evaluation.pixels import psnr
from ..models.previewer import PREVIEWER_SIZES, Previewer, save_previewer
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from ..training import TrainConfig, fit_processes, load_training_state
from ..training.previewer import PreviewerTask
from .figures import image_grid, loss_figure, save_figure
from .finetune import trained_pipeline
from .phases import _ema_into, checkpoint_dir


@dataclass(frozen=True)
class PreviewerParams:
    """Parameters of ``notebooks/13_previewer.ipynb``; 0 / "" take the profile's value."""

    profile: str = params.choice("tiny", *params.PROFILES)
    weights_dir: str = ""   # Pipeline.from_pretrained folder whose compressor it learns ("": latest 05_stage_c run)
    dataset: str = params.choice("procedural", "procedural", "emoji", "folder")
    data_dir: str = ""      # dataset="folder": images + .txt captions, a metadata.csv/.jsonl, or .tar shards
    max_pixels: int = param(MAX_PIXELS, ge=1)   # folder images above this many pixels are skipped (bombs)
    resolution: int = param(0, ge=8, le=4096)   # image size in px (the compressor's training size)
    n_train: int = param(0, ge=1)
    n_val: int = param(0, ge=1)
    size: str = params.choice("", *PREVIEWER_SIZES)  # network size (models/previewer.py)
    upscale: int = param(0, ge=1, le=64)        # output side / latent side, a power of two
    steps: int = param(0, ge=1)
    batch_size: int = param(0, ge=1)
    lr: float = param(0.0, gt=0, le=1)
    warmup_steps: int = param(0, ge=0)
    ema_beta: float = param(0.0, ge=0, lt=1)
    workers: int = param(0, ge=1, le=64)        # CPU training processes (gloo DDP); under torchrun: 1
    seed: int = param(0, ge=0)
    resume: bool = False
    diverge_factor: float = param(100.0, gt=1)
    n_prompts: int = param(0, ge=1, le=64)      # prompts sampled with live previews
    sample_steps: int = param(0, ge=1, le=1000)  # their Stage C steps
    preview_every: int = param(0, ge=1, le=1000)  # a preview every this many Stage C steps

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {"smoke": dict(resolution=64, n_train=32, n_val=8, size="parity", upscale=8, steps=3, batch_size=8,
                              lr=1e-3, warmup_steps=1, ema_beta=0.9, workers=1, n_prompts=2, sample_steps=2,
                              preview_every=1),
                "tiny": dict(resolution=64, n_train=200_000, n_val=128, size="tiny", upscale=8, steps=1500,
                             batch_size=64, lr=2e-3, warmup_steps=50, ema_beta=0.99, workers=2, n_prompts=4,
                             sample_steps=30, preview_every=5),
                "paper": dict(resolution=1024, n_train=10**9, n_val=256, size="paper", upscale=8, steps=50_000,
                              batch_size=64, lr=1e-4, warmup_steps=1000, ema_beta=0.999, workers=1, n_prompts=4,
                              sample_steps=60, preview_every=10)}[profile]

    def check(self) -> None:
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("parameter 'data_dir' is required with dataset='folder' (the images + captions folder)")
        if self.upscale & (self.upscale - 1):
            raise ValueError(f"parameter 'upscale' must be a power of two, got {self.upscale}")

    def train_config(self) -> TrainConfig:
        small = self.profile != "paper"
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           lr_schedule="cosine" if small else "constant", ema_beta=self.ema_beta,
                           ema_every=1 if small else 10, ema_start=self.steps // 10 if small else 1000,
                           ckpt_every=max(1, self.steps // 4) if small else 5000, log_every=max(1, self.steps // 50),
                           seed=self.seed, diverge_factor=self.diverge_factor)


@dataclass
class PreviewerResult:
    previewer: Previewer
    pipe: Pipeline
    metrics: dict[str, Any]
    history: pd.DataFrame
    figures: dict[str, Path]


def _timed(fn: Any) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def quality(previewer: Previewer, task: PreviewerTask, pipe: Pipeline, images: Tensor, mean_image: Tensor,
            seed: int = 0, decoder_steps: int = 12) -> tuple[dict[str, float], dict[str, Tensor]]:
    """PSNR against the downsampled held-out images and milliseconds per image (compressor included): the
    Previewer, the mean training image (a floor) and Stage B + Stage A decoding the same latents with the empty
    prompt (``Pipeline.reconstruct``: the full decoder, its output downsampled)."""
    images = images.to(next(previewer.parameters()).device)
    target = task.target(images, task.latents(images[:1]))
    preview, t_preview = _timed(lambda: previewer.preview(task.latents(images)))
    gens = [torch.Generator().manual_seed(seed + i) for i in range(images.shape[0])]  # empty prompt, as variations
    decoded, t_decode = _timed(lambda: pipe.reconstruct(images, decoder_steps=decoder_steps, generator=gens))
    decoded_small = F.interpolate(decoded, size=target.shape[-2:], mode="area")
    floor = mean_image.to(target.device).expand_as(target)
    n = images.shape[0]
    metrics = {"psnr": psnr(preview, target).mean().item(), "psnr_mean_image": psnr(floor, target).mean().item(),
               "psnr_stage_b_a": psnr(decoded_small, target).mean().item(),
               "ms_per_image_previewer": 1000 * t_preview / n, "ms_per_image_stage_b_a": 1000 * t_decode / n,
               "output_side": int(target.shape[-1])}
    return metrics, {"real (downsampled)": target.cpu(), "Previewer": preview.cpu(),
                     "Stage B + A (downsampled)": decoded_small.cpu()}


def sampling_previews(pipe: Pipeline, prompts: list[str], p: PreviewerParams) -> tuple[list[Tensor], list[str], Tensor]:
    """Sample ``prompts`` with live previews: one row of previews per preview step (the Previewer's images of
    Stage C's prediction) and the final images (Stage B + A)."""
    shots: list[tuple[int, Tensor]] = []
    final = pipe(prompts, height=p.resolution, width=p.resolution, prior_steps=p.sample_steps,
                 decoder_steps=2 if p.profile == "smoke" else 12, generator=torch.Generator().manual_seed(p.seed),
                 preview=lambda step, images: shots.append((step, images.cpu())), preview_every=p.preview_every)
    side = shots[-1][1].shape[-1]
    rows = [s for _, s in shots] + [F.interpolate(final.cpu(), size=(side, side), mode="area")]
    titles = [f"step {i + 1}/{p.sample_steps}" for i, _ in shots] + ["final image"]
    return rows, titles, final


def train_previewer(p: PreviewerParams, run: Run, progress: bool = True) -> PreviewerResult:
    """Train the Previewer on the compressor of the profile's trained pipeline (or ``weights_dir``), measure it and
    sample with it; saved in ``checkpoints/previewer``."""
    t_start = time.time()
    pipe = trained_pipeline(p.profile, p.weights_dir).pipe
    compressor = copy.deepcopy(pipe.semantic_compressor)
    if compressor is None:
        raise ValueError("the pipeline has no Semantic Compressor to train a Previewer on")
    device = next(compressor.parameters()).device
    torch.manual_seed(p.seed)
    config = PREVIEWER_SIZES[p.size]
    previewer = Previewer(dataclasses.replace(config, c_in=compressor.config.c_latent, upscale=p.upscale)).to(device)
    task = PreviewerTask(previewer, compressor, pipe.compressor_size)
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    ckpt = checkpoint_dir(run, "train_previewer")
    state = ckpt / "train_state.pt"
    begin = load_training_state(state)["step"] if p.resume and state.exists() else 0
    t0 = time.time()
    history = fit_processes(task, p.train_config(), train, len(train), ckpt, workers=p.workers, resume=p.resume,
                            progress=progress, on_log=lambda step, rec: run.logger.info(
                                "step %d loss=%.4g psnr=%.3g", step, rec["loss"], rec["psnr"]))
    train_seconds = time.time() - t0
    _ema_into(task, ckpt)
    previewer.eval()
    save_previewer(previewer, checkpoint_dir(run, "previewer"))
    head = train.head(256).to(device)
    mean_image = task.target(head, task.latents(head[:1])).mean(0, keepdim=True)
    scores, grids = quality(previewer, task, pipe, val["image"], mean_image, p.seed,
                            decoder_steps=2 if p.profile == "smoke" else 12)
    pipe.previewer = previewer
    rows, titles, _ = sampling_previews(pipe, val["caption"][:p.n_prompts], p)
    metrics = {**scores, "steps": p.steps, "train_seconds": train_seconds,
               "seconds_per_step": train_seconds / max(1, p.steps - begin), "wall_seconds": time.time() - t_start,
               "parameters": sum(q.numel() for q in previewer.parameters()),
               "final_loss": float(history["loss"].iloc[-5:].mean())}
    cols = min(8, p.n_val)
    figs = {"reconstructions": save_figure(image_grid([g[:cols] for g in grids.values()], list(grids),
                                                      val["caption"][:cols]), run.figure("reconstructions")),
            "sampling_previews": save_figure(image_grid(rows, titles, val["caption"][:p.n_prompts], scale=1.0),
                                             run.figure("sampling_previews")),
            "loss": save_figure(loss_figure(history, ("loss", "psnr")), run.figure("loss"))}
    return PreviewerResult(previewer, pipe, metrics, history, figs)
