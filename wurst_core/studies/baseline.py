"""Notebook 08: the Baseline LDM, a single-stage text-conditional U-Net trained at Stage C's training FLOPs (paper §4,
"Baselines"; Table 2: "trained for as many GPU-hours as Stage C").

Equal compute is counted, not timed: one training step of each arm (forward and backward, the frozen image encoders
included, the cached text encoder not) runs under ``torch.utils.flop_counter`` on a real batch, Stage C's budget is
its FLOPs per step times the steps that ``05_stage_c`` trained (or Stage B's + Stage C's, ``budget="stage_bc"``),
and the baseline trains for the budget divided by its own FLOPs per step. CPU core-seconds (training seconds x worker processes) are reported beside the
FLOPs, never GPU-hours.

The baseline reads what Stage C reads: the same frozen text encoder at the same text layer, the same data stream,
Stage C's objective (schedule and shift, loss weight, t sampler, caption dropout) and the same optimiser and
schedule family (AdamW, warm-up, EMA through ``PhaseParams.train_config``). Its first stage is the frozen tiny
Stage A (f4), the only first stage trained here (``training.tasks.BaselineTask``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from .. import params, paths
from ..data.stream import Stream, load_images
from ..diffusion.samplers import RNG, sample
from ..evaluation.compute import training_flops
from ..models import count_parameters
from ..models.baseline import BASELINE_SIZES, BaselineUNet, load_baseline, save_baseline
from ..params import Domain, param
from ..runs import Run, finished_runs
from ..text import text_encoder_dir
from ..training import BaselineTask, StageBTask, StageCTask, TextCache, freeze, sample_generators
from ..weights import load_model
from .figures import image_grid, save_figure
from .phases import (_COMMON, PhaseParams, _ema_into, _fit_phase, _seed_all, checkpoint_dir, load_stage, text_encoder,
                     upstream)
from .stage_b import StageBParams
from .stage_c import StageCParams, build_stage_c, stage_c_pipeline

BUDGETS: dict[str, tuple[str, ...]] = {"stage_c": ("stage_c",), "stage_bc": ("stage_b", "stage_c")}
FLOPS_ROWS = 32  # rows of the counted batch: the tiny profile's whole batch; larger batches are scaled linearly
DATA_FIELDS = ("dataset", "data_dir", "resolution", "n_train", "seed")  # what makes two data streams the same


@dataclass(frozen=True)
class BaselineParams(PhaseParams):
    size: str = params.choice("", *BASELINE_SIZES)
    steps: int = param(0, ge=0)  # 0: the compute budget's steps; > 0: this many (no longer equal compute)
    budget: str = params.choice("stage_c", *BUDGETS)  # whose training FLOPs the baseline gets
    seeds: str = param("0,1", items=Domain(lo=0))  # training seeds (init, batch order, noise), one run each
    stage_c_seeds: str = "1"  # more Stage C seeds trained here as 05 trains seed 0 ("": none; checked in check())
    sample_steps: int = param(0, ge=1, le=1000)   # DDPM steps of the sample grid
    guidance: float | None = param(None, ge=0)    # classifier-free guidance of the sample grid (on above 1)
    n_prompts: int = param(16, ge=1)              # held-out prompts in the sample grid
    # fractions of its steps at which each seed's EMA weights are also kept: the learning curve in FLOPs that 07's
    # training-cost claim reads (a snapshot's lr has not decayed: it is no run trained at that budget)
    snapshots: str = param("0.125,0.25,0.5", items=Domain(lo=0, hi=1, lo_open=True, hi_open=True))

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        # steps 0 everywhere: the budget sets them; lr 1e-3 as Stage B, which denoises the same Stage A latent
        own = {"smoke": dict(steps=0, lr=1e-3, sample_steps=2, guidance=2.0),
               "tiny": dict(steps=0, lr=1e-3, warmup_steps=100, sample_steps=50, guidance=2.0),
               "paper": dict(steps=0, sample_steps=50, guidance=4.0)}[profile]
        return {**_COMMON[profile], **own}

    def check(self) -> None:
        super().check()
        seeds = params.listed(self.seeds)
        if any(not s.isdigit() for s in seeds):
            raise ValueError(f"parameter 'seeds' must be comma-separated integers >= 0, got {self.seeds!r}")
        if len(set(map(int, seeds))) != len(seeds):
            raise ValueError(f"parameter 'seeds' lists a seed twice: {self.seeds!r}")
        extra = params.listed(self.stage_c_seeds)
        if any(not s.isdigit() for s in extra) or len(set(map(int, extra))) != len(extra):
            raise ValueError(f"parameter 'stage_c_seeds' must be distinct comma-separated integers >= 0, got "
                             f"{self.stage_c_seeds!r}")

    def snapshot_steps(self, steps: int) -> tuple[int, ...]:
        """The distinct steps before ``steps`` that :attr:`snapshots` names (each fraction rounded, at least 1)."""
        picked = {max(1, round(float(f) * steps)) for f in params.listed(self.snapshots)}
        return tuple(sorted(s for s in picked if s < steps))

    def seed_list(self) -> list[int]:
        return [int(s) for s in params.listed(self.seeds)]

    def stage_c_seed_list(self) -> list[int]:
        return [int(s) for s in params.listed(self.stage_c_seeds)]


# ------------------------------------------------------------------------------------------- the budget

@dataclass(frozen=True)
class Arm:
    """One trained model's compute: FLOPs per optimiser step, steps, and (where known) its CPU time."""

    name: str
    flops_per_step: int
    steps: int
    batch_size: int
    train_seconds: float | None = None
    workers: int | None = None
    run: str = ""

    @property
    def total_flops(self) -> int:
        return self.flops_per_step * self.steps

    @property
    def core_seconds(self) -> float | None:
        # one single-threaded process per worker (fit_processes; notebooks run with one thread)
        if self.train_seconds is None or self.workers is None:
            return None
        return self.train_seconds * self.workers


def scaled_flops(counted: int, rows: int, batch_size: int) -> int:
    """FLOPs of a ``batch_size`` step from a count on ``rows`` rows (every op here is per sample: linear in the
    batch), rounded half up."""
    if rows < 1 or batch_size < 1 or counted < 0:
        raise ValueError(f"need rows, batch_size >= 1 and counted >= 0, got {rows}, {batch_size}, {counted}")
    return (2 * counted * batch_size + rows) // (2 * rows)


def budget_flops(arms: Mapping[str, Arm], budget: str) -> int:
    """Training FLOPs the baseline may spend: Stage C's total ("stage_c", the paper's setup) or B's + C's."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
    return sum(arms[name].total_flops for name in BUDGETS[budget])


def steps_for_budget(budget: int, flops_per_step: int) -> int:
    """Optimiser steps that spend ``budget`` FLOPs at ``flops_per_step``: rounded half up, at least one."""
    if flops_per_step < 1 or budget < 0:
        raise ValueError(f"need flops_per_step >= 1 and budget >= 0, got {flops_per_step} and {budget}")
    return max(1, (2 * budget + flops_per_step) // (2 * flops_per_step))  # integers: exact at any size


def flops_table(arms: list[Arm], budget: int) -> pd.DataFrame:
    """One row per arm (and Stage B + C together): FLOPs per step, steps, total FLOPs, share of the budget,
    training seconds, workers and CPU core-seconds (empty where unknown)."""
    rows = [{"arm": a.name, "run": a.run, "batch_size": a.batch_size, "flops_per_step": a.flops_per_step,
             "steps": a.steps, "total_flops": a.total_flops, "of_budget": a.total_flops / budget,
             "train_seconds": a.train_seconds, "workers": a.workers, "core_seconds": a.core_seconds} for a in arms]
    by_name = {a.name: a for a in arms}
    if {"Stage B", "Stage C"} <= set(by_name):  # the whole Würstchen recipe above Stage A, the second budget row
        b, c = by_name["Stage B"], by_name["Stage C"]
        total = b.total_flops + c.total_flops
        known = None if b.core_seconds is None or c.core_seconds is None else b.core_seconds + c.core_seconds
        at = 1 + max(i for i, a in enumerate(arms) if a.name in ("Stage B", "Stage C"))
        rows.insert(at, {"arm": "Stage B + C", "run": "", "batch_size": None, "flops_per_step": None, "steps": None,
                        "total_flops": total, "of_budget": total / budget, "train_seconds": None, "workers": None,
                        "core_seconds": known})
    return pd.DataFrame(rows, dtype=object)  # object: exact integers, and blanks (not nan) where unknown


def _recorded(schema: type, run: Run) -> Any:
    """The parameters an upstream run recorded in its config.json, as its schema (fields it lacks: defaults)."""
    config = json.loads((run.dir / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in config.items() if k in names})


def _step_flops(task: nn.Module, stream: Stream, batch_size: int, seed: int) -> tuple[int, int]:
    """FLOPs of one training step of ``task`` at ``batch_size`` (counted on at most FLOPS_ROWS rows of the real
    stream, scaled linearly), and the rows counted. The text cache is warmed first: in every arm the frozen text
    encoder runs once per distinct caption, not per step."""
    rows = min(batch_size, FLOPS_ROWS, len(stream))
    batch = stream(list(range(rows)))
    task.text(list(batch["caption"]) + [""])
    task.train()
    counted = training_flops(lambda: task(batch, sample_generators(seed, 0, list(range(rows))))[0])
    task.zero_grad(set_to_none=True)
    return scaled_flops(counted, rows, batch_size), rows


def _stream(p: PhaseParams, n: int) -> Stream:
    return Stream(p.dataset, n, p.resolution, p.seed, "train", p.data_dir, p.max_pixels)


def upstream_arms(profile: str) -> tuple[dict[str, Arm], dict[str, Any]]:
    """Stage C's and Stage B's FLOPs per step (their tasks rebuilt from the latest 05 and 04 runs, trained weights
    loaded) and the steps, batch, seconds and workers those runs recorded; also Stage C's parameter count."""
    c_run, b_run = upstream("c", profile), upstream("b", profile)
    sc, sb = _recorded(StageCParams, c_run), _recorded(StageBParams, b_run)
    c_metrics, b_metrics = c_run.metrics(), b_run.metrics()
    # Stage C as 05 builds it: frozen compressor of 04, the text layer 05 read, its objective and latent scaling
    compressor = freeze(load_model(b_run.checkpoints / "semantic"))
    stage_c = load_stage("c", profile).requires_grad_(True)
    c_task = StageCTask(stage_c, compressor, TextCache(text_encoder(profile, sc.text_layer)), sc.diffusion(),
                        sc_size=compressor.config.image_size, p_drop_text=sc.p_drop_text,
                        latent_scaling=sc.latent_scaling, latent_mean=c_metrics.get("latent_mean", 0.0),
                        latent_std=c_metrics.get("latent_std", 1.0))
    c_flops, rows = _step_flops(c_task, _stream(sc, FLOPS_ROWS), sc.batch_size, sc.seed)
    # Stage B as 04 builds it: the compressor trains jointly (its own trainable copy), Stage A frozen, last layer
    stage_b = load_stage("b", profile).requires_grad_(True)
    joint = load_model(b_run.checkpoints / "semantic").requires_grad_(True)
    b_task = StageBTask(stage_b, load_stage("a", profile), joint, TextCache(text_encoder(profile)),
                        sc_size=sb.sc_size or joint.config.image_size, p_drop_sc=sb.p_drop_sc,
                        p_noise_sc=sb.p_noise_sc, p_drop_text=sb.p_drop_text)
    b_flops, _ = _step_flops(b_task, _stream(sb, FLOPS_ROWS), sb.batch_size, sb.seed)
    arms = {"stage_c": Arm("Stage C", c_flops, int(c_metrics["steps"]), sc.batch_size,
                           c_metrics.get("train_seconds"), sc.workers, f"05_stage_c/{c_run.run_id}"),
            "stage_b": Arm("Stage B", b_flops, int(b_metrics["steps"]), sb.batch_size,
                           b_metrics.get("train_seconds"), sb.workers, f"04_stage_b/{b_run.run_id}")}
    info = {"rows_counted": rows, "parameters_stage_c": count_parameters(stage_c)}
    return arms, info


def _refuse_paper_size(p: BaselineParams) -> None:
    if p.size == "paper":
        with torch.device("meta"):  # shapes only: the ~1B network is built without memory
            n = count_parameters(BaselineUNet(BASELINE_SIZES["paper"]))
        raise RuntimeError(f"the paper-size baseline U-Net ({n / 1e9:.2f}B parameters) is built but not trained here: "
                           "this study trains in CPU worker processes, and a 1B U-Net at 1024 px needs a GPU "
                           "cluster; run the smoke or tiny profile")


def _same_data(p: BaselineParams, sc: StageCParams) -> None:
    differ = [f"{k}={getattr(p, k)!r} (05: {getattr(sc, k)!r})" for k in DATA_FIELDS if getattr(p, k) != getattr(sc, k)]
    if differ:
        raise ValueError("the baseline trains on Stage C's data stream to be compared with it; these differ from "
                         f"the latest 05_stage_c run: {', '.join(differ)}")


@dataclass
class BaselineResult:
    histories: dict[int, pd.DataFrame]
    flops: pd.DataFrame
    metrics: dict[str, Any]
    models: dict[str, nn.Module]
    figures: dict[str, Path]


def train_baseline(p: BaselineParams, run: Run, progress: bool = True) -> BaselineResult:
    """Count each arm's training FLOPs, train the baseline for the budget once per seed, sample held-out prompts."""
    t0 = time.time()
    _refuse_paper_size(p)
    sc = _recorded(StageCParams, upstream("c", p.profile))  # what Stage C read: the baseline reads the same
    _same_data(p, sc)
    arms, info = upstream_arms(p.profile)
    diffusion = sc.diffusion()  # Stage C's objective: only the network and its latent differ
    stage_a = freeze(load_stage("a", p.profile))
    text = TextCache(text_encoder(p.profile, sc.text_layer))
    cfg = dataclasses.replace(BASELINE_SIZES[p.size], c_cond=text.encoder.width, c_in=stage_a.config.c_latent)
    train = _stream(p, p.n_train)
    val = load_images(p.dataset, p.n_val, p.resolution, p.seed, "val", p.data_dir, progress, p.max_pixels)

    def make_task() -> BaselineTask:
        return BaselineTask(BaselineUNet(cfg), stage_a, text, diffusion, p_drop_text=sc.p_drop_text)

    flops, _ = _step_flops(make_task(), train, p.batch_size, p.seed)
    budget = budget_flops(arms, p.budget)
    steps = p.steps or steps_for_budget(budget, flops)
    message = (f"baseline: {flops:.4g} FLOPs per step; budget {p.budget} = {budget:.4g} FLOPs -> {steps} steps "
               f"per seed ({'from the budget' if not p.steps else 'set by hand'})")
    run.logger.info(message)
    print(message, flush=True)
    histories, seconds, unets = {}, {}, {}
    snapshot_steps = p.snapshot_steps(steps)
    for seed in p.seed_list():
        _seed_all(seed)  # the seed draws the U-Net's init, then the batch order and every noise draw
        task = make_task()
        histories[seed], seconds[seed] = _fit_phase(task, dataclasses.replace(p, steps=steps, seed=seed), run,
                                                    f"baseline_seed{seed}", train, progress, snapshot_steps)
        save_baseline(task.unet, checkpoint_dir(run, f"baseline_seed{seed}"))  # EMA weights (_fit_phase loaded them)
        unets[seed] = task.unet
        for step in snapshot_steps:  # the same network's EMA weights earlier in training
            snap = make_task()
            _ema_into(snap, checkpoint_dir(run, f"train_baseline_seed{seed}"), step)
            save_baseline(snap.unet, checkpoint_dir(run, snapshot_name(seed, step)))
    c_seconds = {}
    for seed in p.stage_c_seed_list():  # Würstchen's seed spread: Stage C again, as 05 trains it, from another seed
        if seed == sc.seed:
            raise ValueError(f"parameter 'stage_c_seeds' lists {seed}, the seed the 05_stage_c run already trained")
        sc_seed = dataclasses.replace(sc, seed=seed, resume=p.resume, workers=p.workers)
        task, stream, b_run = build_stage_c(dataclasses.replace(sc_seed, seed=sc.seed), seed=seed)  # 05's data stream
        _, c_seconds[seed] = _fit_phase(task, sc_seed, run, f"stage_c_seed{seed}", stream, progress)
        stage_c_pipeline(task, sc, b_run).save(checkpoint_dir(run, f"pipeline_stage_c_seed{seed}"),
                                               text_encoder_dir=text_encoder_dir(p.profile))
    c_arm = arms["stage_c"]
    table = flops_table([c_arm, arms["stage_b"]]
                        + [dataclasses.replace(c_arm, name=f"Stage C, seed {s}", train_seconds=t, workers=p.workers,
                                               run=f"{run.notebook}/{run.run_id}") for s, t in c_seconds.items()]
                        + [Arm(f"baseline, seed {s}", flops, steps, p.batch_size, seconds[s], p.workers,
                               f"{run.notebook}/{run.run_id}") for s in unets], budget)
    run.save_table("flops", table)
    first = next(iter(unets))
    prompts = val["caption"][:p.n_prompts]
    images = sample_grid(unets[first], stage_a, text, prompts, p.resolution, p.sample_steps, p.guidance or 0.0,
                         diffusion.schedule, p.seed, progress)
    final = {f"seed{s}": float(h["loss"].iloc[-5:].mean()) for s, h in histories.items()}
    metrics = {"final_loss": final, "final_loss_mean": sum(final.values()) / len(final),
               "flops_per_step": {"stage_c": arms["stage_c"].flops_per_step,
                                  "stage_b": arms["stage_b"].flops_per_step, "baseline": flops},
               "flops_rows_counted": info["rows_counted"], "budget": p.budget, "budget_flops": budget,
               "baseline_flops": steps * flops, "budget_ratio": steps * flops / budget, "steps": steps,
               "snapshot_steps": list(snapshot_steps),
               "steps_from_budget": not p.steps, "stage_c_steps": arms["stage_c"].steps,
               "stage_b_steps": arms["stage_b"].steps, "seeds": list(unets), "stage_c_seeds": list(c_seconds),
               "stage_c_train_seconds": {f"seed{s}": t for s, t in c_seconds.items()},
               "train_seconds": {f"seed{s}": t for s, t in seconds.items()},
               "core_seconds": {f"seed{s}": t * p.workers for s, t in seconds.items()},
               "wall_seconds": time.time() - t0, "parameters_baseline": count_parameters(unets[first]),
               "parameters_stage_c": info["parameters_stage_c"], "text_layer": sc.text_layer,
               "upstream": {"stage_c": arms["stage_c"].run, "stage_b": arms["stage_b"].run}}
    figs = {"loss": save_figure(seeds_loss_figure(histories), run.figure("loss")),
            "samples": save_figure(samples_figure(val["image"][:len(prompts)], images, prompts, first),
                                   run.figure("samples"))}
    return BaselineResult(histories, table, metrics, {"unets": unets, "stage_a": stage_a}, figs)


@torch.no_grad()
def sample_grid(unet: nn.Module, stage_a: nn.Module, text: TextCache, prompts: list[str], resolution: int,
                steps: int, guidance: float, schedule: Any, seed: int, progress: bool = False,
                generator: RNG | None = None) -> torch.Tensor:
    """DDPM samples of the U-Net for ``prompts``, guided against empty-caption tokens as 05's pipeline guides
    Stage C, decoded by Stage A: images (N, 3, H, W) in [0, 1]. Noise from ``generator`` (one, or one per prompt),
    else from one generator seeded with ``seed``."""
    unet.eval()
    side = resolution // stage_a.config.downscale
    cond, uncond = text(prompts), text([""] * len(prompts))
    latents = sample(unet, (len(prompts), unet.config.c_in, side, side), steps, {"text_tokens": cond},
                     {"text_tokens": uncond}, guidance, "ddpm",
                     generator=torch.Generator().manual_seed(seed) if generator is None else generator,
                     progress=progress, schedule=schedule)
    return stage_a.decode(latents).clamp(0, 1)


def latest_baseline_run(profile: str, budget: str = "stage_c") -> Run | None:
    """The latest finished ``08_baseline`` run of ``profile`` trained at ``budget`` (a run that records none trained
    at Stage C's, the default), so that a run at Stage B + C's budget never stands in for the paper's setup."""
    runs = [r for r in finished_runs("08_baseline", profile) if r.metrics().get("budget", "stage_c") == budget]
    return runs[-1] if runs else None


def snapshot_name(seed: int, step: int) -> str:
    """The checkpoint folder of the EMA weights that seed ``seed`` had after ``step`` steps."""
    return f"baseline_seed{seed}_step{step}"


@dataclass
class TrainedBaseline:
    """A finished ``08_baseline`` run, ready to sample: one EMA U-Net per training seed, with the Stage A, text
    encoder, schedule and sampling settings that 08 trained and sampled it with."""

    run: Run
    unets: dict[int, BaselineUNet]
    stage_a: nn.Module
    text: TextCache
    schedule: Any
    resolution: int
    sample_steps: int
    guidance: float
    stage_c_pipelines: dict[int, Path] = dataclasses.field(default_factory=dict)  # more Würstchen seeds, by seed
    snapshots: dict[tuple[int, int], BaselineUNet] = dataclasses.field(default_factory=dict)  # (seed, step) -> EMA
    flops_per_step: int = 0       # the baseline's training FLOPs per step (08's count)
    steps: int = 0                # its steps: the last snapshot is the final network
    stage_c_flops: int = 0        # the training FLOPs of the Stage C the budget came from
    stage_bc_flops: int = 0       # ... and of Stage B + C
    budget: str = "stage_c"       # whose training FLOPs it was given (BUDGETS)

    def sample(self, seed: int, prompts: list[str], generator: RNG, step: int | None = None) -> torch.Tensor:
        """Images of the U-Net trained with ``seed`` for ``prompts``, as 08's sample grid draws them; ``step``: its
        EMA weights after that step (one of 08's snapshots) instead of the final ones."""
        unet = self.unets[seed] if step is None or step == self.steps else self.snapshots[seed, step]
        return sample_grid(unet, self.stage_a, self.text, prompts, self.resolution, self.sample_steps,
                           self.guidance, self.schedule, seed, generator=generator)


def load_trained_baseline(run: Run) -> TrainedBaseline:
    """What a finished ``08_baseline`` run trained, rebuilt as :func:`train_baseline` built it: the U-Net of every
    seed (``checkpoints/baseline_seed<s>``), Stage A as 08 loads it (the profile's latest ``03_stage_a``), the text
    encoder at the recorded text layer, and the schedule of the ``05_stage_c`` run that set its budget."""
    metrics, config = run.metrics(), json.loads((run.dir / "config.json").read_text())
    seeds = [int(s) for s in metrics.get("seeds", [])]
    folders = {s: run.dir / "checkpoints" / f"baseline_seed{s}" for s in seeds}
    missing = [s for s, f in folders.items() if not (f / "model.json").is_file()]
    if not seeds or missing:
        raise FileNotFoundError(f"{run.dir} holds no trained baseline for seeds {missing or 'any'}: rerun "
                                "notebooks/08_baseline.ipynb")
    notebook, c_id = metrics["upstream"]["stage_c"].split("/")  # the Stage C run whose objective 08 trained with
    sc = _recorded(StageCParams, Run(notebook, run.profile, c_id, paths.runs_dir() / notebook / run.profile / c_id))
    pipelines = {int(s): run.dir / "checkpoints" / f"pipeline_stage_c_seed{s}"
                 for s in metrics.get("stage_c_seeds", [])}
    snapshots = {(s, int(t)): load_baseline(run.dir / "checkpoints" / snapshot_name(s, int(t)))
                 for s in seeds for t in metrics.get("snapshot_steps", [])}  # a run from before snapshots has none
    c_flops = metrics["flops_per_step"]["stage_c"] * metrics["stage_c_steps"]
    return TrainedBaseline(run, {s: load_baseline(f) for s, f in folders.items()}, freeze(load_stage("a", run.profile)),
                           TextCache(text_encoder(run.profile, metrics["text_layer"])), sc.diffusion().schedule,
                           int(config["resolution"]), int(config["sample_steps"]), float(config.get("guidance") or 0.0),
                           pipelines, snapshots, int(metrics["flops_per_step"]["baseline"]), int(metrics["steps"]),
                           int(c_flops), int(c_flops + metrics["flops_per_step"]["stage_b"] * metrics["stage_b_steps"]),
                           metrics.get("budget", "stage_c"))


def seeds_loss_figure(histories: Mapping[int, pd.DataFrame]):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for seed, h in histories.items():
        marker = "o" if len(h) < 20 else None  # a short run (smoke) logs too few steps for a line
        ax.plot(h["step"], h["loss"], lw=0.8, marker=marker, label=f"seed {seed}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title="Baseline U-Net: training loss per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def samples_figure(real: torch.Tensor, generated: torch.Tensor, prompts: list[str], seed: int):
    """Held-out real images above the baseline's samples for their captions, in rows of (at most) 8."""
    cols = min(8, len(prompts))
    starts = range(0, len(prompts) - cols + 1, cols)
    grid = [r for i in starts for r in (real[i:i + cols], generated[i:i + cols])]
    titles = [t for _ in starts for t in ("held-out real", f"baseline (seed {seed})")]
    return image_grid(grid, titles, prompts[:cols])
