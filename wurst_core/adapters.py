"""What plugs into sampling besides the three networks: live previews of Stage C's predictions (and, through
:mod:`wurst_core.training.lora`, LoRA adapters; ``Pipeline.load_adapter``).

:func:`preview_hooks` wraps Stage C's denoiser so that after every ``every``-th sampler step (and the last) a
callback receives what Stage C currently predicts the clean latent to be: ``x0 = (x_t - sqrt(1 - ab) eps) /
sqrt(ab)`` from the step's input and its (guided) noise estimate, with ``ab`` at the network's noise condition
``r`` (the shifted schedule's ``alpha_bar(t)`` is the unshifted one at ``r``, ``diffusion.samplers.eps_denoiser``).
The last step reports the sample itself. The wrapper returns the network's output unchanged and draws no random
numbers, so sampling with previews gives the same images as sampling without (``tests/test_previewer.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from .diffusion import CosineSchedule, predict_x0

PreviewCallback = Callable[[int, Tensor], Any]  # (Stage C step index, preview images or latents)
StepCallback = Callable[[int, Tensor, Tensor], Any]  # the sampler's (step, t, x)
Denoiser = Callable[..., Tensor]


def preview_hooks(denoise: Denoiser, step_callback: StepCallback | None, guidance: float, schedule: CosineSchedule,
                  decode: Callable[[Tensor], Tensor], preview: PreviewCallback,
                  every: int = 1) -> tuple[Denoiser, StepCallback]:
    """The denoiser and sampler callback to pass to ``samplers.sample`` instead of ``denoise`` and
    ``step_callback``: ``preview(i, decode(x0))`` runs after step ``i`` when ``(i + 1) % every == 0`` or the step
    reaches t = 0. ``decode`` maps Stage C's data space to what the caller shows (the Previewer's images, or the
    raw latents). ``guidance``: the sampler's; above 1 the denoiser sees the doubled batch (conditional half
    first) and the preview uses ``lerp(eps_uncond, eps_cond, guidance)``, as the sampler does."""
    if every < 1:
        raise ValueError(f"preview_every must be >= 1, got {every}")
    at_r = dataclasses.replace(schedule, shift=1.0)
    last: dict[str, Tensor] = {}

    def tapped(x: Tensor, r: Tensor, **cond: Tensor) -> Tensor:
        eps = denoise(x, r, **cond)
        last.update(x=x, r=r, eps=eps)
        return eps

    def step(i: int, t: Tensor, x_next: Tensor) -> None:
        if step_callback is not None:
            step_callback(i, t, x_next)
        final = bool((t == 0).all())
        if not final and (i + 1) % every:
            return
        if final:
            x0 = x_next
        else:
            x, r, eps = last["x"], last["r"], last["eps"].to(x_next.dtype)
            if guidance > 1:
                eps_c, eps_u = eps.chunk(2)
                eps, x, r = torch.lerp(eps_u, eps_c, guidance), x.chunk(2)[0], r.chunk(2)[0]
            x0 = predict_x0(x, eps, r, at_r)
        preview(i, decode(x0))

    return tapped, step
