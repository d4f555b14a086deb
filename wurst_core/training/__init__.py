"""Training: one loop for the three stages (``loop``: AdamW, warm-up, EMA, clipping, accumulation, atomic
checkpoints, exact resume, divergence guard, DDP/FSDP, forked CPU workers) and their objectives (``tasks``)."""
from __future__ import annotations

from .loop import (EMA, DivergenceGuard, ResumeMismatch, TrainConfig, TrainingDiverged, batch_indices, fit,
                   fit_processes, load_training_state, lr_at, sample_generators)
from .tasks import StageATask, StageBTask, StageCTask, TextCache, drop_captions, freeze, random_crops

__all__ = ["EMA", "DivergenceGuard", "ResumeMismatch", "TrainConfig", "TrainingDiverged", "batch_indices", "fit",
           "fit_processes", "load_training_state", "lr_at", "sample_generators", "StageATask", "StageBTask",
           "StageCTask", "TextCache", "drop_captions", "freeze", "random_crops"]
