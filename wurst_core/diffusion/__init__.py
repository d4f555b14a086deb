"""Diffusion maths: the schedule, the training objective (noising, eps target, loss weights, t sampler) in
``objective`` and the samplers over a denoiser in ``samplers``."""
from __future__ import annotations

from . import samplers
from .objective import LOSS_WEIGHTS, T_SAMPLERS, CosineSchedule, Diffusion, diffuse, loss_weight, predict_x0, sample_t

__all__ = ["samplers", "LOSS_WEIGHTS", "T_SAMPLERS", "CosineSchedule", "Diffusion", "diffuse", "loss_weight",
           "predict_x0", "sample_t"]
