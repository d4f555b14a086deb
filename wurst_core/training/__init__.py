"""Training: one loop for the three stages (``loop``: AdamW, warm-up, EMA, clipping, accumulation, atomic
checkpoints, exact resume, divergence guard, DDP/FSDP, forked CPU workers) and their objectives (``tasks``; also the
single-stage Baseline LDM's)."""
from __future__ import annotations

from .loop import (EMA, DivergenceGuard, ResumeMismatch, TrainConfig, TrainingDiverged, batch_indices, fit,
                   fit_processes, load_training_state, lr_at, sample_generators, snapshot_path)
from .tasks import BaselineTask, StageATask, StageBTask, StageCTask, TextCache, drop_captions, freeze, random_crops

__all__ = ["EMA", "DivergenceGuard", "ResumeMismatch", "TrainConfig", "TrainingDiverged", "batch_indices", "fit",
           "fit_processes", "load_training_state", "lr_at", "sample_generators", "snapshot_path", "BaselineTask",
           "StageATask", "StageBTask", "StageCTask", "TextCache", "drop_captions", "freeze", "random_crops"]
