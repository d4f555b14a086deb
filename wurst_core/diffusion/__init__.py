"""Diffusion maths: the schedule, the training objective (noising, targets eps / v / x0 and their conversions, loss
weights, t sampler) in ``objective`` and the samplers over a denoiser in ``samplers``."""
from __future__ import annotations

from . import samplers
from .objective import (LOSS_WEIGHTS, T_SAMPLERS, TARGETS, CosineSchedule, Diffusion, diffuse, loss_weight,
                        output_to_eps, output_to_x0, predict_x0, sample_t, training_target)
from .samplers import eps_denoiser

__all__ = ["samplers", "LOSS_WEIGHTS", "T_SAMPLERS", "TARGETS", "CosineSchedule", "Diffusion", "diffuse",
           "eps_denoiser", "loss_weight", "output_to_eps", "output_to_x0", "predict_x0", "sample_t",
           "training_target"]
