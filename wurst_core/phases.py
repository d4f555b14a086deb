"""The paper's three training phases (Fig. 3) as functions the training notebooks call.

Each phase: build the networks of its profile, load the upstream phase's checkpoint (the latest run of the upstream
notebook on the same profile), train with :func:`wurst_core.train.fit`, evaluate on held-out data, save the weights
(``<run>/checkpoints/<stage>/model.safetensors`` + ``model.json``) and figures. Parameters are frozen dataclasses
that are also the notebooks' parameter schemas (``profile_defaults`` fills what a notebook leaves at 0 / "").
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import notebook
from .data import MAX_PIXELS, make_dataset
from .diffusion import LOSS_WEIGHTS, T_SAMPLERS, CosineSchedule, Diffusion
from .evaluation.pixels import psnr, ssim
from .models.semantic import (SEMANTIC_SIZES, SemanticCompressor, SemanticCompressorConfig, preprocess,
                              tiny_backbone_widths)
from .models.stage_a import STAGE_A_SIZES, StageA
from .models.stage_b import STAGE_B_SIZES, StageB
from .models.stage_c import STAGE_C_SIZES, StageC
from .notebook import param
from .runs import Run, latest_run
from .tasks import StageATask, StageBTask, StageCTask, TextCache, freeze
from .text import LAYERS
from .train import TrainConfig, fit_processes, load_training_state

STAGE_NOTEBOOKS = {"a": "03_stage_a", "b": "04_stage_b", "c": "05_stage_c"}


# ----------------------------------------------------------------------------------------------------- data
class Stream:
    """Training items rendered (or read) on demand: ``stream(indices) -> {"image", "caption"}``.

    The procedural generator renders ~4,000 images/s, so a fresh image for every sample costs less than 3 % of a
    tiny training step, and a large ``n_train`` means the networks rarely see an image twice: no memorisation of a
    small pool, which the compositional held-out prompts would expose.
    """

    def __init__(self, kind: str, n: int, resolution: int, seed: int, split: str = "train", data_dir: str = "",
                 max_pixels: int = MAX_PIXELS):
        kw: dict[str, Any] = {"size": n, "resolution": resolution, "seed": seed, "split": split}
        if kind == "folder":
            kw = {"root": data_dir, "resolution": resolution, "seed": seed, "split": split}
        self.dataset = make_dataset(kind, max_pixels=max_pixels, **kw)
        self.n = min(n, len(self.dataset))

    def __len__(self) -> int:
        return self.n

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        items = [self.dataset[i] for i in idx]
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}

    def head(self, n: int) -> torch.Tensor:
        """The images of the first ``n`` items (statistics such as latent scales)."""
        return self(list(range(min(n, self.n))))["image"]


def load_images(kind: str, n: int, resolution: int, seed: int, split: str, data_dir: str = "",
                progress: bool = True, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """Materialise ``n`` items of a dataset in memory: {"image": (n,3,H,W), "caption": [...], "attributes": [...]}
    (held-out sets, evaluated several times)."""
    from tqdm.auto import tqdm

    stream = Stream(kind, n, resolution, seed, split, data_dir, max_pixels)
    items = [stream.dataset[i] for i in tqdm(range(len(stream)), desc=f"render {kind}/{split}", disable=not progress,
                                             mininterval=1.0)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "attributes": [it.get("attributes") for it in items]}


# ----------------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class PhaseParams:
    """Settings every phase shares (the leading parameters of notebooks 03-05)."""

    profile: str = notebook.choice("tiny", *notebook.PROFILES)
    dataset: str = notebook.choice("procedural", "procedural", "emoji", "folder")
    data_dir: str = ""          # folder dataset root (dataset="folder")
    max_pixels: int = param(MAX_PIXELS, ge=1)     # folder images above this many pixels are skipped (bombs)
    resolution: int = param(0, ge=8, le=4096)     # training image size in pixels
    n_train: int = param(0, ge=1)                 # size of the training set, streamed (procedural: distinct images)
    n_val: int = param(0, ge=1)                   # held-out images for the metrics
    size: str = ""              # model size registry key (each stage's schema lists its registry)
    steps: int = param(0, ge=1)
    batch_size: int = param(0, ge=1)
    lr: float = param(0.0, gt=0, le=1)
    warmup_steps: int = param(0, ge=0)
    lr_schedule: str = notebook.choice("", "constant", "cosine")
    ema_beta: float = param(0.0, ge=0, lt=1)
    grad_accum: int = param(1, ge=1)
    workers: int = param(0, ge=1, le=64)          # CPU training processes joined by gloo DDP (tiny: 2)
    seed: int = param(0, ge=0)
    resume: bool = False
    diverge_factor: float = param(100.0, gt=1)    # stop when the smoothed loss exceeds its best by this factor

    def check(self) -> None:
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("parameter 'data_dir' is required with dataset='folder' (the images + captions folder)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"parameter 'batch_size' ({self.batch_size}) must be divisible by 'grad_accum' "
                             f"({self.grad_accum})")

    def train_config(self) -> TrainConfig:
        """The optimisation settings; EMA every step after 10 % warm-up on the small profiles."""
        small = self.profile != "paper"
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           lr_schedule=self.lr_schedule, grad_accum=self.grad_accum, ema_beta=self.ema_beta,
                           ema_every=1 if small else 100, ema_start=self.steps // 10 if small else 5000,
                           ckpt_every=max(1, self.steps // 4) if small else 5000,
                           log_every=max(1, self.steps // 50) if small else 100, seed=self.seed,
                           diverge_factor=self.diverge_factor)


_COMMON = {
    "smoke": dict(resolution=64, n_train=32, n_val=16, steps=3, batch_size=8, warmup_steps=1, lr_schedule="constant",
                  ema_beta=0.9, size="parity", workers=1),
    # workers=2: both cores of the 2-core CPU machine, one process each (`train.fit_processes`): Stage C steps 1.45x
    # faster (285 -> 197 ms), where 2 intra-op threads gave 1.4x alone and were 2.5x slower beside another job
    "tiny": dict(resolution=64, n_train=200_000, n_val=256, batch_size=32, lr_schedule="cosine", ema_beta=0.995,
                 size="tiny", workers=2),
    # paper (official §6a): AdamW lr 1e-4, 10k linear warm-up then constant, EMA beta 0.9 every 100 after 5k
    "paper": dict(resolution=1024, n_train=10**9, n_val=1000, batch_size=1280, lr=1e-4, warmup_steps=10_000,
                  lr_schedule="constant", ema_beta=0.9, size="paper", steps=1_500_000, workers=1),  # torchrun: 1/GPU
}


@dataclass(frozen=True)
class StageAParams(PhaseParams):
    size: str = notebook.choice("", *STAGE_A_SIZES)
    l1_weight: float = param(0.0, ge=0)          # extra L1 reconstruction term
    reset_every: int = param(0, ge=1)            # dead-code reset period in steps (0: profile default)
    crop: int = param(0, ge=8)                   # side of the random training crops (>= resolution: whole images)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        own = {"smoke": dict(steps=3, lr=1e-3, reset_every=2, crop=64),
               # 32 px crops: a quarter of the compute per step; 1500 steps gave 29.2 dB on whole 64 px images
               "tiny": dict(steps=1200, lr=2e-3, warmup_steps=100, reset_every=100, crop=32),
               "paper": dict(resolution=256, batch_size=256, reset_every=1000, crop=256)}[profile]
        return {**_COMMON[profile], **own}


@dataclass(frozen=True)
class StageBParams(PhaseParams):
    size: str = notebook.choice("", *STAGE_B_SIZES)
    compressor: str = notebook.choice("", *SEMANTIC_SIZES)  # tiny: a small CNN; paper: EfficientNetV2-S
    compressor_weights: str = ""    # optional local file with ImageNet (or released) compressor weights
    compressor_stages: int = param(0, ge=0, le=8)  # tiny backbone: stride-2 stages, 3: 64 px -> 8 x 8 (0: its own)
    sc_size: int = param(0, ge=8, le=4096)   # compressor input size (paper §3.1: 786/768 px -> 24 x 24)
    p_drop_sc: float = param(0.05, ge=0, le=1)   # released recipe: 5 % of the compressor embeddings dropped (CFG)
    p_noise_sc: float = param(0.3, ge=0, le=1)   # ... 30 % noised with t ~ U(0, 0.5)
    p_drop_text: float = param(0.05, ge=0, le=1)
    sample_steps: int = param(0, ge=1, le=1000)  # Stage B sampling steps for the reconstructions (paper: tau_B = 12)
    decoder_guidance: float | None = param(None, ge=0)  # Stage B guidance of the reconstructions and pipeline

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        own = {"smoke": dict(steps=3, lr=1e-3, compressor="tiny", sc_size=64, sample_steps=2, decoder_guidance=2.0),
               # 64 px images, four stride-2 stages: 4 x 4 x 16 latents (16:1 per side; 42:1 would leave 1.5 x 1.5).
               # 1700 steps: 2000 gave 0.9 dB more reconstruction PSNR than 1600, but Stage C gains more from the time
               # guidance 2 on the compressor map (5 % of it dropped in training) keeps the small objects that the
               # unguided tiny Stage B drops: reconstructions A(B(sc(x))) had the prompt's objects in the right cells
               # for 88 % of held-out images instead of 65 % (probe, 256 images; guidance 4: 66 %)
               "tiny": dict(steps=1700, lr=1e-3, warmup_steps=100, compressor="tiny", compressor_stages=4, sc_size=64,
                            sample_steps=12, decoder_guidance=2.0),
               "paper": dict(compressor="paper", sc_size=768, sample_steps=12, decoder_guidance=0.0)}[profile]
        return {**_COMMON[profile], **own}


@dataclass(frozen=True)
class StageCParams(PhaseParams):
    size: str = notebook.choice("", *STAGE_C_SIZES)
    latent_scaling: str = notebook.choice("", "v2", "std", "none")  # v2: (f+1)/42 as released | std: unit variance
    p_drop_text: float = param(0.05, ge=0, le=1)  # paper §3.2: text dropped 5 % of the time (CFG)
    loss_weight: str = notebook.choice("p2", *LOSS_WEIGHTS)  # paper §3.2: p2 weighting
    t_sampler: str = notebook.choice("", *T_SAMPLERS)  # stretched (released, 7.5 % at t = 1) | uniform
    noise_shift: float = param(0.0, gt=0, le=64)  # logSNR shift of the training t: 1 = Würstchen v2, > 1 noisier
    text_layer: str = notebook.choice("", *LAYERS)  # text hidden states Stage C reads (released v2: last)
    guidance: float | None = param(None, ge=0)   # Stage C guidance of the sample grid and saved pipeline
    sample_steps: int = param(0, ge=1, le=1000)  # tau_C (paper: 60)
    n_prompts: int = param(16, ge=1)             # held-out prompts in the sample grid
    layout_probe_steps: int = param(-1, ge=0, unset=-1)  # text-layout probe steps per text layer (0: no probe)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        released = dict(t_sampler="stretched", noise_shift=1.0, guidance=4.0, text_layer="last")  # official §5a
        own = {"smoke": dict(steps=3, lr=1e-3, latent_scaling="std", sample_steps=2, layout_probe_steps=20,
                             **{**released, "text_layer": "penultimate"}),
               # Stage C is the stage still far from converged in the CPU budget: from 2000 to 3000 steps the loss rise
               # when the caption's positions are swapped went 0.07 -> 0.15, colours 0.35 -> 0.83; lr 2e-3 gave 0.19
               # at 3000 steps, 3e-3 0.13 (`caption_sensitivity`, same upstream stages)
               # A 4 x 4 prior decides where objects go at high noise (t ~ 0.7-0.95), where the eps loss barely sees it:
               # training t shifted to more noise (logSNR - 2 log 2, uniform t) doubled the loss rise on swapped
               # positions, 0.17 -> 0.31; sampled on the same shift, probe cell IoU went 21 -> 29 % (same upstream)
               # Two worker processes (`workers`) give 4300 steps in the time 2600 took: from 2600 to 4500 steps the
               # loss rise on swapped positions went 0.31 -> 0.72, colours 0.85 -> 1.38 (same upstream; a shift of 4
               # at 4500 steps: 0.70 and 1.21). Guidance 2 instead of 4 (with Stage B's guidance 2): probe count
               # 57 -> 68 %, position 13 -> 16 %, colour 38 -> 42 %, size 43 -> 56 % (256 held-out prompts; 3: 65, 16,
               # 40, 49; 6: 45, 11, 32, 35)
               # Stage C on oracle layout tokens (one per grid cell, parsed from the caption) instead of the tiny CLIP's,
               # same recipe: probe position 80.5 %, cell IoU 90 % against 19.5 and 41 % (256 held-out prompts): the text
               # features were the limit. With the CLIP's token-wise term (text.ClipTraining.filip), Stage C reading
               # the penultimate layer: position 34.0 %, cell IoU 54.0 %, colour 62.5 %; the last layer: 25.8, 45.1,
               # 57.8 % (the layout probe reads the penultimate layer better too: 96 against 88 % of occupied cells)
               "tiny": dict(steps=4300, lr=2e-3, warmup_steps=100, latent_scaling="std", sample_steps=30,
                            t_sampler="uniform", noise_shift=2.0, guidance=2.0, text_layer="penultimate",
                            layout_probe_steps=3000),
               "paper": dict(latent_scaling="v2", sample_steps=60, layout_probe_steps=3000, **released)}[profile]
        return {**_COMMON[profile], **own}

    def diffusion(self) -> Diffusion:
        """The training objective: schedule (with the shift), p2 or other loss weight, and the t sampler."""
        return Diffusion(schedule=CosineSchedule(shift=self.noise_shift), weight=self.loss_weight,
                         t_sampler=self.t_sampler)


# ----------------------------------------------------------------------------------------------------- helpers
def checkpoint_dir(run: Run, stage: str) -> Path:
    return run.checkpoints / stage


def upstream(stage: str, profile: str) -> Run:
    """The latest run of the notebook that trains ``stage`` on ``profile``; a clear error if there is none."""
    name = STAGE_NOTEBOOKS[stage]
    run = latest_run(name, profile)
    if run is None or not (run.checkpoints / f"stage_{stage}" / "model.json").exists():
        raise FileNotFoundError(f"no trained Stage {stage.upper()} for profile {profile!r}: run notebooks/{name}.ipynb "
                                f"first (or `wurst run {name} --profile {profile}`)")
    return run


def load_stage(stage: str, profile: str, name: str | None = None) -> nn.Module:
    from .weights import load_model

    run = upstream(stage, profile)
    return load_model(run.checkpoints / (name or f"stage_{stage}"))


def text_encoder(profile: str, layer: str = "last") -> nn.Module:
    """The frozen conditioning text encoder of a profile: the tiny CLIP of notebook 01 (trained on first use),
    read at ``layer`` ("last", "pre_norm" or "penultimate": text.TextEncoder)."""
    from .text import get_or_train_tiny_text_encoder

    return get_or_train_tiny_text_encoder(profile, layer=layer)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(rows: list[torch.Tensor], titles: list[str] | None = None, captions: list[str] | None = None,
               scale: float = 1.2):
    """A matplotlib figure: one row per tensor (N,3,H,W) in [0,1], with optional row titles and column captions."""
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(scale * n, scale * len(rows) + (0.6 if captions else 0)),
                             squeeze=False)
    for r, imgs in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0 and titles:
                ax.set_ylabel(titles[r], fontsize=8)
            if r == 0 and captions:
                ax.set_title("\n".join(_wrap(captions[c], 18)), fontsize=5)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur]


def loss_figure(history: pd.DataFrame, keys: tuple[str, ...] = ("loss",)):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        if k in history:
            ax.plot(history["step"], history[k])
            ax.set_xlabel("step"), ax.set_title(k)
            if k in ("loss", "mse", "vq"):
                ax.set_yscale("log")
    fig.tight_layout()
    return fig


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _ema_into(task: nn.Module, ckpt: Path) -> None:
    """Load the EMA weights of the finished run into ``task`` (evaluation and export use EMA weights)."""
    from .train import EMA, load_training_state

    state = load_training_state(ckpt / "train_state.pt")
    ema = EMA(task)
    ema.load_state_dict(state["ema"])
    ema.copy_to(task)


# ----------------------------------------------------------------------------------------------------- Stage A
def _fit_phase(task: nn.Module, p: PhaseParams, run: Run, stage: str, data: Stream,
               progress: bool) -> tuple[pd.DataFrame, float]:
    """Train ``task`` on ``data`` into ``<run>/checkpoints/train_<stage>``, then load its EMA weights; returns the
    log and the training seconds."""
    ckpt = checkpoint_dir(run, f"train_{stage}")
    if p.resume:
        state = ckpt / "train_state.pt"
        begin = load_training_state(state)["step"] if state.exists() else 0
        message = f"Stage {stage.upper()}: resuming {run.dir} from step {begin} of {p.steps}"
        run.logger.info(message)
        print(message, flush=True)
    t1 = time.time()
    history = fit_processes(task, p.train_config(), data, len(data), ckpt, workers=p.workers, resume=p.resume,
                            progress=progress, on_log=lambda step, rec: run.logger.info(
                                "step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "step")))
    seconds = time.time() - t1
    _ema_into(task, ckpt)
    task.eval()
    return history, seconds


@dataclass
class PhaseResult:
    history: pd.DataFrame
    metrics: dict[str, float]
    models: dict[str, nn.Module]
    figures: dict[str, Path]


def train_stage_a(p: StageAParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage A: the f4 VQGAN, reconstruction + codebook + 0.25 commitment, dead-code resets."""
    from .weights import save_model

    t0 = time.time()
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    _seed_all(p.seed)
    model = StageA(STAGE_A_SIZES[p.size])
    task = StageATask(model, l1_weight=p.l1_weight, reset_every=p.reset_every,
                      reset_until=p.steps * p.grad_accum // 2, crop=p.crop)
    history, train_seconds = _fit_phase(task, p, run, "a", train, progress)
    # Stage B diffuses encode(x) = z / scale_factor. The released 0.3764 belongs to the released VQGAN; a new one
    # gets the std of its own latents (as Stable Diffusion's scale factor), so that Stage B sees unit variance: with
    # std 2.4 instead, the cosine schedule leaves so much signal at t ~ 1 that the eps-parameterised x0 estimate
    # there is useless and Stage B's samples lose their objects.
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
    scale = round(_batched(model._encode_raw, images).std().item(), 4)
    model.config = dataclasses.replace(model.config, scale_factor=scale)
    return scale


@torch.no_grad()
def stage_a_metrics(model: StageA, images: torch.Tensor) -> dict[str, float]:
    rec = _batched(lambda x: model.decode(model.encode(x)), images)
    rec_q = _batched(lambda x: model.decode(model.encode(x, quantize=True)), images)
    idx = _batched(lambda x: model.quantize(model._encode_raw(x))[1], images)
    counts = torch.bincount(idx.flatten(), minlength=model.config.codebook_size).float()
    prob = counts / counts.sum()
    return {"psnr": psnr(rec, images).mean().item(), "psnr_quantized": psnr(rec_q, images).mean().item(),
            "ssim": ssim(rec, images).mean().item(), "ssim_quantized": ssim(rec_q, images).mean().item(),
            "codebook_perplexity": math.exp(-(prob[prob > 0] * prob[prob > 0].log()).sum().item()),
            "codebook_used": int((counts > 0).sum()), "codebook_size": model.config.codebook_size}


# ----------------------------------------------------------------------------------------------------- Stage B
def _stage_b_config(p: StageBParams, text_width: int):
    return dataclasses.replace(STAGE_B_SIZES[p.size], clip_embd=text_width)


def train_stage_b(p: StageBParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage B with the Semantic Compressor trained jointly (paper §3.1)."""
    from .weights import load_model, save_model

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
    pipe = tiny_pipeline(None, stage_b, stage_a, text.encoder, compressor, "none", 0.0, 1.0, p.resolution, p.sc_size)

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
    save_model(stage_b, checkpoint_dir(run, "stage_b"))
    save_model(compressor, checkpoint_dir(run, "semantic"))
    rows, titles = [val["image"][:n_fig], plain[:n_fig]], ["input", "A(B(sc)), no guidance"]
    if p.decoder_guidance:
        rows, titles = rows + [recon[:n_fig]], titles + [f"guidance {p.decoder_guidance:g}"]
    figs = {"reconstructions": save_figure(image_grid(rows, titles, val["caption"][:n_fig]),
                                           run.figure("reconstructions")),
            "loss": save_figure(loss_figure(history), run.figure("loss"))}
    return PhaseResult(history, metrics, {"stage_b": stage_b, "semantic": compressor}, figs)


# ----------------------------------------------------------------------------------------------------- Stage C
def train_stage_c(p: StageCParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage C: text-conditional diffusion at the compressor's resolution (paper §3.2)."""
    from .text import LAYERS
    from .weights import save_model

    t0 = time.time()
    diffusion = p.diffusion()  # invalid settings fail before any work
    if p.text_layer not in LAYERS:
        raise ValueError(f"text_layer must be one of {LAYERS}, got {p.text_layer!r}")
    b_run = upstream("b", p.profile)
    from .weights import load_model

    compressor = freeze(load_model(b_run.checkpoints / "semantic"))
    text = TextCache(text_encoder(p.profile, p.text_layer))
    b_params = __import__("json").loads((b_run.dir / "config.json").read_text())
    sc_size = int(b_params["sc_size"])
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    # unit-variance statistics of the frozen compressor's latents ("std" scaling)
    f = _batched(lambda x: compressor(preprocess(x, sc_size)), train.head(512))
    mean, std = f.mean().item(), f.std().item()
    _seed_all(p.seed)
    cfg = dataclasses.replace(STAGE_C_SIZES[p.size], c_cond=text.encoder.width, c_in=compressor.config.c_latent)
    stage_c = StageC(cfg)
    task = StageCTask(stage_c, compressor, text, diffusion, sc_size=sc_size,
                      p_drop_text=p.p_drop_text, latent_scaling=p.latent_scaling, latent_mean=mean, latent_std=std)
    history, train_seconds = _fit_phase(task, p, run, "c", train, progress)
    save_model(stage_c, checkpoint_dir(run, "stage_c"))
    from .io import write_json

    write_json(checkpoint_dir(run, "stage_c") / "latent_scaling.json",
               {"latent_scaling": p.latent_scaling, "mean": mean, "std": std, "sc_size": sc_size})
    pipe = tiny_pipeline(stage_c, load_stage("b", p.profile), load_stage("a", p.profile), text.encoder, compressor,
                         p.latent_scaling, mean, std, p.resolution, sc_size, p.noise_shift, p.guidance,
                         float(b_params.get("decoder_guidance") or 0.0),  # Stage B's own (04_stage_b)
                         decoder_text=text.encoder.with_layer("last"))  # as Stage B trained (train_stage_b)
    from .text import text_encoder_dir

    pipe.save(checkpoint_dir(run, "pipeline"), text_encoder_dir=text_encoder_dir(p.profile))
    prompts = val["caption"][:p.n_prompts]
    images = pipe(prompts, height=p.resolution, width=p.resolution, prior_steps=p.sample_steps,
                  decoder_steps=12 if p.profile != "smoke" else 2,
                  generator=torch.Generator().manual_seed(p.seed), progress=progress)
    metrics = {"final_loss": float(history["loss"].iloc[-5:].mean()), "train_seconds": train_seconds,
               "wall_seconds": time.time() - t0, "steps": p.steps, "latent_mean": mean, "latent_std": std,
               "parameters_stage_c": sum(q.numel() for q in stage_c.parameters())}
    figs = {}
    if p.dataset == "procedural":  # which caption words the prior reads (evaluation/sensitivity.py)
        sens = stage_c_sensitivity(stage_c, task, val["attributes"][:128], val["image"][:128], p.seed)
        metrics["caption_sensitivity"] = sens.mean().to_dict()
        figs["sensitivity"] = save_figure(sensitivity_figure(sens), run.figure("caption_sensitivity"))
    if p.dataset == "procedural" and p.layout_probe_steps > 0:  # can its text features carry the layout at all?
        layout = text_layout_study(text.encoder, p.layout_probe_steps, p.seed)
        metrics["text_layout_probe"] = {layer: float(d["occupied"].iloc[-1]) for layer, d in layout.groupby("layer")}
        figs["text_layout"] = save_figure(text_layout_figure(layout, p.text_layer), run.figure("text_layout"))
    cols = min(8, len(prompts))
    rows = [images[i:i + cols] for i in range(0, len(prompts) - cols + 1, cols)]
    truth = [val["image"][i:i + cols] for i in range(0, len(prompts) - cols + 1, cols)]
    grid = [r for pair in zip(truth, rows) for r in pair]
    titles = [t for _ in rows for t in ("held-out real", "generated")]
    figs.update({"samples": save_figure(image_grid(grid, titles, prompts[:cols]), run.figure("samples")),
                 "loss": save_figure(loss_figure(history), run.figure("loss"))})
    return PhaseResult(history, metrics, {"stage_c": stage_c, "pipeline": pipe}, figs)


def stage_c_sensitivity(stage_c: nn.Module, task: StageCTask, attributes: list[dict[str, Any]], images: torch.Tensor,
                        seed: int = 0, ts: tuple[float, ...] = (0.4, 0.6, 0.8, 0.95)) -> pd.DataFrame:
    """Relative rise of Stage C's loss on held-out latents when the captions' positions, shapes, sizes or colours
    are changed, or the caption is dropped (:func:`wurst_core.evaluate.caption_sensitivity`); rows: t."""
    from .evaluate import caption_sensitivity, counterfactual_captions

    captions = counterfactual_captions(attributes, seed=seed)
    with torch.no_grad():
        tokens = {k: task.text.encoder(c).tokens.float() for k, c in captions.items()}
    return caption_sensitivity(stage_c.eval(), task.encode(images), tokens, ts=ts, seed=seed)


def text_layout_study(encoder: nn.Module, steps: int, seed: int = 0,
                      layers: tuple[str, ...] = ("last", "penultimate")) -> pd.DataFrame:
    """The layout probe (evaluation/text_layout.py) on each ``layer`` of the frozen text encoder: procedural
    training captions (64 per step, at most 16,384) and 1,024 held-out ones (fewer on short runs)."""
    from .data import make_dataset
    from .evaluation.text_layout import layout_probe, layout_targets

    def captions(split: str, n: int) -> tuple[list[str], torch.Tensor]:
        ds = make_dataset("procedural", size=n, resolution=16, seed=seed, split=split)
        items = [ds[i] for i in range(n)]
        return [it["caption"] for it in items], layout_targets([it["attributes"] for it in items])

    n_train = min(16_384, 64 * steps)
    (train, y_train), (val, y_val) = captions("train", n_train), captions("val", min(1024, n_train // 4))
    out = []
    for layer in layers:
        view = encoder.with_layer(layer)
        with torch.no_grad():
            f_train, f_val = (torch.cat([view(c[i:i + 512]).tokens.float() for i in range(0, len(c), 512)])
                              for c in (train, val))
        out.append(layout_probe(f_train, y_train, f_val, y_val, steps=steps, seed=seed).assign(layer=layer))
    return pd.concat(out, ignore_index=True)


def text_layout_figure(layout: pd.DataFrame, used: str = ""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for layer, d in layout.groupby("layer"):
        label = layer + (" (Stage C reads it)" if layer == used else "")
        ax.plot(d["step"], 100 * d["occupied"], marker="o", label=label)
    ax.set_xlabel("probe steps (64 captions each)")
    ax.set_ylabel("held-out occupied cells right (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Layout read from the text tokens by 9 learned queries", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sensitivity_figure(sens: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3))
    for col in sens.columns:
        ax.plot(sens.index, 100 * sens[col], marker="o", label=col)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="t (noise level)", ylabel="loss rise vs the true caption (%)",
           title="Which caption words Stage C reads")
    ax.legend(title="caption changed", fontsize=8)
    fig.tight_layout()
    return fig


def tiny_pipeline(stage_c: nn.Module | None, stage_b: nn.Module, stage_a: nn.Module, text: nn.Module,
                  compressor: nn.Module, scaling: str, mean: float, std: float, resolution: int, sc_size: int,
                  shift: float = 1.0, prior_guidance: float = 4.0, decoder_guidance: float = 0.0,
                  decoder_text: nn.Module | None = None):
    """A :class:`~wurst_core.pipeline.Pipeline` over workbench-trained networks whose compression ratios differ
    from the released 42.67 / 10.67 (e.g. 64 px images, 4 x 4 compressor latents, 16 x 16 Stage A latents).
    ``text`` serves Stage C, and Stage B too unless ``decoder_text`` is given."""
    from .pipeline import Pipeline

    c_side = compressor(torch.zeros(1, 3, sc_size, sc_size)).shape[-1]
    b_side = resolution // stage_a.config.downscale
    return Pipeline(stage_c, stage_b, stage_a, text, decoder_text or text, semantic_compressor=compressor,
                    stage_c_scaling=scaling, stage_c_mean=mean, stage_c_std=std, stage_c_shift=shift,
                    prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                    resolution_multiple=resolution / c_side, latent_dim_scale=b_side / c_side, compressor_size=sc_size)
