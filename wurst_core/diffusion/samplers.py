"""Samplers as functions over a denoiser ``eps = denoise(x, r, **cond)`` (k-diffusion style).

- ``eps_denoiser``: wraps a network trained on another target (``v``, ``x0``) into such an eps denoiser, so the
  steps below serve every target of ``objective.TARGETS`` unchanged.
- ``ddpm_step``: ancestral DDPM, the paper's sampler (§3.3) and diffusers' ``DDPMWuerstchenScheduler.step``,
  written with the same operations in the same order so that results are bit-identical in float32.
- ``ddim_step``: DDIM (Song et al. 2021), deterministic for ``eta = 0``; ``eta = 1`` is the DDPM posterior again.
- ``sample``: the loop, with classifier-free guidance ``lerp(eps_uncond, eps_cond, w)`` computed from ONE batched
  forward with the conditional half first, on iff ``w > 1`` (docs/reference.md#classifier-free-guidance).

RNG parity with diffusers: the initial noise is drawn first, then DDPM draws ``z`` at *every* step, the last
(deterministic, ``t_prev = 0``) one included, all from the same generator; a CPU generator draws on the CPU and the
result is moved to the target device (as diffusers' ``randn_tensor``). A list of generators, one per batch row (as
diffusers takes), draws each row from its own generator: a row's noise then does not depend on the batch it is in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .objective import CosineSchedule, _check_target, _expand, output_to_eps

SAMPLERS = ("ddpm", "ddim")

# The released Stage C schedule (docs/reference.md#released-sampling-settings), built in numpy float64 as diffusers
# does, so the float32 tensor is bit-identical.
DEFAULT_STAGE_C_TIMESTEPS: tuple[float, ...] = tuple(
    float(v) for v in list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]
)

Denoiser = Callable[..., Tensor]
Callback = Callable[[int, Tensor, Tensor], Any]
RNG = torch.Generator | Sequence[torch.Generator]  # one generator, or one per batch row


def eps_denoiser(denoise: Denoiser, target: str = "eps", schedule: CosineSchedule = CosineSchedule()) -> Denoiser:
    """``denoise(x, r, ...)`` returning an output under ``target`` -> a denoiser returning eps (``output_to_eps``).

    ``eps``: ``denoise`` itself (the released path, untouched). Otherwise the wrapper sees only ``r`` (the noise
    condition), so it takes ``alpha_bar`` as the *unshifted* schedule at ``r``: ``r = noise_cond(t)`` is defined by
    that equality (docs/reference.md#noise-shift), exact at shift 1 (``r = t``), up to float rounding otherwise.
    Guidance stays a lerp of eps: the conversion is affine in the output, so guiding eps or the raw output agree.
    """
    _check_target(target)
    if target == "eps":
        return denoise
    at_r = dataclasses.replace(schedule, shift=1.0)  # alpha_bar(t) of the shifted schedule = unshifted alpha_bar(r)

    def eps_of(x: Tensor, r: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = denoise(x, r, *args, **kwargs)
        if out.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return output_to_eps(out, x, torch.as_tensor(r, device=x.device).expand(x.shape[0]), target, at_r)

    return eps_of


def make_timesteps(steps: int | Sequence[float] | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """float32 timesteps from 1 (noise) towards 0: ``linspace(1, 0, steps + 1)`` for an int (``steps`` network
    evaluations, as diffusers' ``set_timesteps``), else the given strictly decreasing values in [0, 1]."""
    if isinstance(steps, bool):
        raise TypeError("steps must be an int or a sequence of timesteps, got a bool")
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"need at least 1 sampling step, got {steps}")
        return torch.linspace(1.0, 0.0, steps + 1, device=device)
    ts = torch.as_tensor(np.asarray(steps.cpu() if isinstance(steps, Tensor) else steps, dtype=np.float64))
    ts = ts.to(dtype=torch.float32, device=device)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"custom timesteps must be a 1-D list of at least 2 values, got shape {tuple(ts.shape)}")
    if not bool(((ts >= 0) & (ts <= 1)).all()):
        raise ValueError(f"timesteps must lie in [0, 1], got {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing (noise -> data), got {ts.tolist()}")
    return ts


def randn(shape: Sequence[int], generator: RNG | None = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise; a CPU generator draws on the CPU, then the tensor moves (diffusers ``randn_tensor``).
    A list of generators draws row ``i`` of the batch from ``generator[i]``."""
    if isinstance(generator, (list, tuple)):
        if len(shape) == 0 or len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for shape {tuple(shape)}: pass one per batch row")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    device = torch.device(device)
    rand_device = generator.device if generator is not None else device
    if generator is not None and rand_device.type != device.type and rand_device.type != "cpu":
        raise ValueError(f"cannot draw a {device.type} tensor from a {rand_device.type} generator")
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def ddpm_step(x: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor,
              schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """One ancestral DDPM step from ``t`` to ``t_prev`` (both (B,)), paper §3.3:

    ``alpha = ab_t/ab_prev``, ``mu = alpha^-1/2 · (x - (1-alpha)·eps/sqrt(1-ab_t))``,
    ``sigma = sqrt((1-alpha)(1-ab_prev)/(1-ab_t))``, ``x_prev = mu + sigma·noise·[t_prev != 0]``.
    """
    ab = _expand(schedule.alpha_bar(t).to(x.device), x)
    ab_prev = _expand(schedule.alpha_bar(t_prev).to(x.device), x)
    alpha = ab / ab_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - ab).sqrt())
    std = ((1 - alpha) * (1.0 - ab_prev) / (1.0 - ab)).sqrt() * noise
    return (mu + std * _expand((t_prev != 0).float().to(x.device), x)).to(eps.dtype)


def ddim_step(x: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor | None = None, eta: float = 0.0,
              schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """One DDIM step: ``x0 = (x - sqrt(1-ab)·eps)/sqrt(ab)``,
    ``x_prev = sqrt(ab_prev)·x0 + sqrt(1-ab_prev-sigma²)·eps + sigma·noise`` with
    ``sigma = eta·sqrt((1-ab_prev)/(1-ab))·sqrt(1-ab/ab_prev)`` (``eta = 0``: deterministic)."""
    ab = _expand(schedule.alpha_bar(t).to(x.device), x)
    ab_prev = _expand(schedule.alpha_bar(t_prev).to(x.device), x)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).clamp(min=0).sqrt()
    out = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out.to(eps.dtype)


def _cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Conditional half first, then the unconditional one (diffusers' order)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out: dict[str, Any] = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, Tensor):
            if not isinstance(u, Tensor) or u.shape != c.shape:
                raise ValueError(f"uncond[{k!r}] must be a tensor shaped like cond[{k!r}] {tuple(c.shape)}")
            out[k] = torch.cat([c, u])
        else:
            out[k] = c
    return out


@torch.no_grad()
def sample(denoise: Denoiser, shape_or_x: Sequence[int] | Tensor, timesteps: int | Sequence[float] | Tensor = 20,
           cond: Mapping[str, Any] | None = None, uncond: Mapping[str, Any] | None = None, guidance: float = 1.0,
           sampler: str = "ddpm", generator: RNG | None = None, callback: Callback | None = None,
           progress: bool = False, *, eta: float = 0.0, schedule: CosineSchedule = CosineSchedule(),
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Run the reverse process from ``t = timesteps[0]`` to ``timesteps[-1]`` and return the final ``x``.

    ``shape_or_x``: a shape (the start noise is drawn from ``generator``, or row by row from a list of one generator
    per row) or a start tensor. ``timesteps``: a
    number of steps (uniform in t) or a custom decreasing list such as ``DEFAULT_STAGE_C_TIMESTEPS``.
    ``denoise(x, r, **cond)`` returns eps; with ``guidance > 1`` it is called once per step on the doubled batch
    ``cat([cond, uncond])`` and ``eps = lerp(eps_uncond, eps_cond, guidance)``. ``callback(i, t, x)`` receives the
    step index, the (B,) time just reached and the intermediate latents after every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cond = dict(cond or {})
    use_cfg = guidance > 1
    if use_cfg:
        if uncond is None:
            raise ValueError(f"guidance {guidance} > 1 needs `uncond` (the unconditional inputs)")
        cond = _cat_cond(cond, uncond)
    if isinstance(shape_or_x, Tensor):
        x = shape_or_x.to(device=device or shape_or_x.device, dtype=dtype)
    else:
        x = randn(shape_or_x, generator, device or "cpu", dtype)
    ts = make_timesteps(timesteps, device=x.device)
    b = x.shape[0]
    steps = range(ts.numel() - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{sampler} sampling", leave=False)
    for i in steps:
        t, t_prev = ts[i].expand(b), ts[i + 1].expand(b)
        r = schedule.noise_cond(t)
        if use_cfg:
            eps_c, eps_u = denoise(torch.cat([x, x]), torch.cat([r, r]), **cond).chunk(2)
            eps = torch.lerp(eps_u, eps_c, guidance)
        else:
            eps = denoise(x, r, **cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
        eps = eps.to(x.dtype)
        if sampler == "ddpm":
            x = ddpm_step(x, eps, t, t_prev, randn(x.shape, generator, x.device, x.dtype), schedule)
        else:
            noise = randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
            x = ddim_step(x, eps, t, t_prev, noise, eta, schedule)
        if callback is not None:
            callback(i, t_prev, x)
    return x
