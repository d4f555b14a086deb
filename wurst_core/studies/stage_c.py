"""Notebook 05: Stage C, the text-conditional prior at the compressor's resolution (paper section 3.2)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from .. import params
from ..data import make_dataset
from ..data.stream import Stream, load_images
from ..diffusion import LOSS_WEIGHTS, T_SAMPLERS, CosineSchedule, Diffusion
from ..evaluation.sensitivity import caption_sensitivity, counterfactual_captions
from ..evaluation.text_layout import layout_probe, layout_targets
from ..models.semantic import preprocess
from ..models.stage_c import STAGE_C_SIZES, StageC
from ..params import param
from ..pipeline import Pipeline
from ..runs import Run
from ..text import LAYERS, text_encoder_dir
from ..training import StageCTask, TextCache, freeze
from ..weights import load_model, sampling_of, save_model
from .figures import image_grid, loss_figure, save_figure
from .phases import (_COMMON, PhaseParams, PhaseResult, _batched, _fit_phase, _seed_all, checkpoint_dir, load_stage,
                     text_encoder, upstream)


@dataclass(frozen=True)
class StageCParams(PhaseParams):
    size: str = params.choice("", *STAGE_C_SIZES)
    latent_scaling: str = params.choice("", "v2", "std", "none")  # v2: (f+1)/42 as released | std: unit variance
    p_drop_text: float = param(0.05, ge=0, le=1)  # paper §3.2: text dropped 5 % of the time (CFG)
    # p2 = 1 - alpha_bar as released, not the form the paper prints (docs/reference.md#released-objective)
    loss_weight: str = params.choice("p2", *LOSS_WEIGHTS)
    t_sampler: str = params.choice("", *T_SAMPLERS)  # stretched (released, 7.5 % at t = 1) | uniform
    noise_shift: float = param(0.0, gt=0, le=64)  # logSNR shift of the training t: 1 = Würstchen v2, > 1 noisier
    text_layer: str = params.choice("", *LAYERS)  # text hidden states Stage C reads (released v2: last)
    guidance: float | None = param(None, ge=0)   # Stage C guidance of the sample grid and saved pipeline
    sample_steps: int = param(0, ge=1, le=1000)  # tau_C (paper: 60)
    n_prompts: int = param(16, ge=1)             # held-out prompts in the sample grid
    layout_probe_steps: int = param(-1, ge=0, unset=-1)  # text-layout probe steps per text layer (0: no probe)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        # the released v2 prior (docs/reference.md#released-objective, docs/reference.md#released-sampling-settings)
        released = dict(t_sampler="stretched", noise_shift=1.0, guidance=4.0, text_layer="last")
        own = {"smoke": dict(steps=3, lr=1e-3, latent_scaling="std", sample_steps=2, layout_probe_steps=20,
                             **{**released, "text_layer": "penultimate"}),
               # 4300 steps: Stage C gains most from time (docs/findings.md#stage-c-steps-and-learning-rate)
               # lr 1e-3: 2e-3 diverged (docs/findings.md#stage-c-divergence-at-lr-2e-3-on-the-novel-split)
               # uniform t, logSNR shift 2: placement is decided at high noise (docs/findings.md#stage-c-noise-shift)
               # guidance 2, not 4: more prompts get their counts right (docs/findings.md#guidance-stage-c)
               # penultimate text layer: the layout reads better from it (docs/findings.md#text-encoder-text-layer)
               "tiny": dict(steps=4300, lr=1e-3, warmup_steps=100, latent_scaling="std", sample_steps=30,
                            t_sampler="uniform", noise_shift=2.0, guidance=2.0, text_layer="penultimate",
                            layout_probe_steps=3000),
               "paper": dict(latent_scaling="v2", sample_steps=60, layout_probe_steps=3000, **released)}[profile]
        return {**_COMMON[profile], **own}

    def diffusion(self) -> Diffusion:
        """The training objective: schedule (with the shift), p2 or other loss weight, and the t sampler."""
        return Diffusion(schedule=CosineSchedule(shift=self.noise_shift), weight=self.loss_weight,
                         t_sampler=self.t_sampler)


def build_stage_c(p: StageCParams, seed: int | None = None) -> tuple[StageCTask, Stream, Run]:
    """Stage C's training task as 05 builds it: the frozen compressor of the latest ``04_stage_b`` run, the text
    encoder at ``p.text_layer``, latent statistics of the stream (seed ``p.seed``) and a network initialised from
    ``seed`` (default ``p.seed``); with the stream and the Stage B run it read."""
    diffusion = p.diffusion()  # invalid settings fail before any work
    if p.text_layer not in LAYERS:
        raise ValueError(f"text_layer must be one of {LAYERS}, got {p.text_layer!r}")
    b_run = upstream("b", p.profile)
    compressor = freeze(load_model(b_run.checkpoints / "semantic"))
    text = TextCache(text_encoder(p.profile, p.text_layer))
    sc_size = compressor.config.image_size  # the compressor's input size, as Stage B trained it
    train = Stream(p.dataset, p.n_train, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)
    # unit-variance statistics of the frozen compressor's latents ("std" scaling)
    f = _batched(lambda x: compressor(preprocess(x, sc_size)), train.head(512))
    mean, std = f.mean().item(), f.std().item()
    _seed_all(p.seed if seed is None else seed)
    cfg = dataclasses.replace(STAGE_C_SIZES[p.size], c_cond=text.encoder.width, c_in=compressor.config.c_latent)
    task = StageCTask(StageC(cfg), compressor, text, diffusion, sc_size=sc_size,
                      p_drop_text=p.p_drop_text, latent_scaling=p.latent_scaling, latent_mean=mean, latent_std=std)
    return task, train, b_run


def stage_c_pipeline(task: StageCTask, p: StageCParams, b_run: Run) -> Pipeline:
    """The three-stage pipeline around a trained Stage C, with the profile's Stage B and Stage A."""
    text = task.text
    return Pipeline.from_networks(stage_c=task.stage_c, stage_b=load_stage("b", p.profile),
                                  stage_a=load_stage("a", p.profile), text=text.encoder, compressor=task.compressor,
                                  resolution=p.resolution, scaling=task.scaling, shift=p.noise_shift,
                                  prior_guidance=p.guidance,
                                  decoder_guidance=sampling_of(b_run.checkpoints / "stage_b").get("guidance", 0.0),
                                  decoder_text=text.encoder.with_layer("last"))  # Stage B trained on the last layer


def train_stage_c(p: StageCParams, run: Run, progress: bool = True) -> PhaseResult:
    """Stage C: text-conditional diffusion at the compressor's resolution (paper §3.2)."""
    t0 = time.time()
    task, train, b_run = build_stage_c(p)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)
    stage_c, text = task.stage_c, task.text
    history, train_seconds = _fit_phase(task, p, run, "c", train, progress)
    save_model(stage_c, checkpoint_dir(run, "stage_c"))
    pipe = stage_c_pipeline(task, p, b_run)
    pipe.save(checkpoint_dir(run, "pipeline"), text_encoder_dir=text_encoder_dir(p.profile))
    prompts = val["caption"][:p.n_prompts]
    images = pipe(prompts, height=p.resolution, width=p.resolution, prior_steps=p.sample_steps,
                  decoder_steps=12 if p.profile != "smoke" else 2,
                  generator=torch.Generator().manual_seed(p.seed), progress=progress)
    metrics = {"final_loss": float(history["loss"].iloc[-5:].mean()), "train_seconds": train_seconds,
               "wall_seconds": time.time() - t0, "steps": p.steps, "latent_mean": task.scaling.mean,
               "latent_std": task.scaling.std,
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
    are changed, or the caption is dropped (:func:`wurst_core.evaluation.caption_sensitivity`); rows: t."""
    captions = counterfactual_captions(attributes, seed=seed)
    with torch.no_grad():
        tokens = {k: task.text.encoder(c).tokens.float() for k, c in captions.items()}
    return caption_sensitivity(stage_c.eval(), task.encode(images), tokens, ts=ts, seed=seed)


def text_layout_study(encoder: nn.Module, steps: int, seed: int = 0,
                      layers: tuple[str, ...] = ("last", "penultimate")) -> pd.DataFrame:
    """The layout probe (evaluation/text_layout.py) on each ``layer`` of the frozen text encoder: procedural
    training captions (64 per step, at most 16,384) and 1,024 held-out ones (fewer on short runs)."""
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
    fig, ax = plt.subplots(figsize=(5.5, 3))
    for col in sens.columns:
        ax.plot(sens.index, 100 * sens[col], marker="o", label=col)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="t (noise level)", ylabel="loss rise vs the true caption (%)",
           title="Which caption words Stage C reads")
    ax.legend(title="caption changed", fontsize=8)
    fig.tight_layout()
    return fig
