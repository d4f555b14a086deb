"""What the three training notebooks (03-05) share: the common parameters and profile table, the upstream stages
of a profile, and the training call with its EMA weights (paper Fig. 3: Stage A, then B, then C).

Each stage's study (``stage_a``, ``stage_b``, ``stage_c``) builds the networks of its profile, loads the upstream
stage's checkpoint (the latest run of the upstream notebook on the same profile), trains with
:func:`wurst_core.training.fit_processes`, evaluates on held-out data and saves weights and figures.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .. import params
from ..data import MAX_PIXELS
from ..data.stream import Stream
from ..params import param
from ..runs import Run, latest_run
from ..text import load_tiny_text_encoder
from ..training import EMA, TrainConfig, fit_processes, load_training_state, snapshot_path
from ..weights import load_model

STAGE_NOTEBOOKS = {"a": "03_stage_a", "b": "04_stage_b", "c": "05_stage_c"}


@dataclass(frozen=True)
class PhaseParams:
    """Settings every phase shares (the leading parameters of notebooks 03-05)."""

    profile: str = params.choice("tiny", *params.PROFILES)
    dataset: str = params.choice("procedural", "procedural", "emoji", "folder")
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
    lr_schedule: str = params.choice("", "constant", "cosine")
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
    # workers=2: one single-threaded process per core beats intra-op threads (docs/findings.md#tiny-profile-two-workers)
    "tiny": dict(resolution=64, n_train=200_000, n_val=256, batch_size=32, lr_schedule="cosine", ema_beta=0.995,
                 size="tiny", workers=2),
    # paper: the released recipe (docs/reference.md#training-recipe)
    "paper": dict(resolution=1024, n_train=10**9, n_val=1000, batch_size=1280, lr=1e-4, warmup_steps=10_000,
                  lr_schedule="constant", ema_beta=0.9, size="paper", steps=1_500_000, workers=1),  # torchrun: 1/GPU
}


def run_log(progress: bool, run: Run | None):
    """A study's message sink: the run's log, and stdout when ``progress`` (notebooks show it)."""
    def log(msg: str) -> None:
        if progress:
            print(msg, flush=True)
        if run is not None:
            run.logger.info(msg)

    return log


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
    run = upstream(stage, profile)
    return load_model(run.checkpoints / (name or f"stage_{stage}"))


def text_encoder(profile: str, layer: str = "last") -> nn.Module:
    """The frozen conditioning text encoder of a profile: the tiny CLIP that notebook 01 trained, read at ``layer``
    ("last", "pre_norm" or "penultimate"); a clear error naming notebook 01 when it has not run."""
    return load_tiny_text_encoder(profile, layer=layer)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def _ema_into(task: nn.Module, ckpt: Path, step: int | None = None) -> None:
    """Load the EMA weights of the finished run (or those kept after ``step``, one of its ``snapshot_steps``) into
    ``task`` (evaluation and export use EMA weights)."""
    state = load_training_state(ckpt / "train_state.pt" if step is None else snapshot_path(ckpt, step))
    ema = EMA(task)
    ema.load_state_dict(state["ema"])
    ema.copy_to(task)


def _fit_phase(task: nn.Module, p: PhaseParams, run: Run, stage: str, data: Stream,
               progress: bool, snapshot_steps: tuple[int, ...] = ()) -> tuple[pd.DataFrame, float]:
    """Train ``task`` on ``data`` into ``<run>/checkpoints/train_<stage>``, then load its EMA weights; returns the
    log and the training seconds. ``snapshot_steps``: steps after which the EMA weights are also kept there."""
    ckpt = checkpoint_dir(run, f"train_{stage}")
    if p.resume:
        state = ckpt / "train_state.pt"
        begin = load_training_state(state)["step"] if state.exists() else 0
        message = f"Stage {stage.upper()}: resuming {run.dir} from step {begin} of {p.steps}"
        run.logger.info(message)
        print(message, flush=True)
    t1 = time.time()
    cfg = dataclasses.replace(p.train_config(), snapshot_steps=tuple(snapshot_steps))
    history = fit_processes(task, cfg, data, len(data), ckpt, workers=p.workers, resume=p.resume,
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
