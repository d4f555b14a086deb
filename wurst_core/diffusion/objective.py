"""Diffusion maths of Würstchen v2: cosine schedule, forward noising, training-time t, targets, loss weights.

Paper §3.2; the released objective and StableCascade's shift: docs/reference.md#released-objective,
docs/reference.md#noise-shift. Symbols:

- ``t`` in [0, 1] is continuous time, ``t = 1`` is pure noise; the networks receive it as ``r``.
- ``alpha_bar(t) = clamp(cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), 1e-4, 0.9999)`` with ``s = 0.008``.
- ``x_t = sqrt(alpha_bar)·x0 + sqrt(1 - alpha_bar)·eps`` (paper §3.2).

The objective is composed, as in StableCascade's GDF: schedule x training target x loss weight x t sampler. The
target is what the network is trained to output: ``eps`` (released, paper §3.2), ``v = sqrt(ab)·eps -
sqrt(1-ab)·x0`` (v-prediction, Salimans & Ho 2022) or ``x0``; ``output_to_eps`` / ``output_to_x0`` turn any of them
back into a noise or a data estimate, so the eps samplers run every target (``samplers.eps_denoiser``).

The A/B head (``eps = (x_t - A) / (|1 - B| + 1e-5)``) and its plain-output ablation live in the Stage C model: both
are a network *output*, so the maths here is the same for either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

LOSS_WEIGHTS = ("p2", "p2_paper", "constant")
T_SAMPLERS = ("stretched", "uniform")
TARGETS = ("eps", "v", "x0")


@dataclass(frozen=True)
class CosineSchedule:
    """The cosine schedule of Nichol & Dhariwal as Würstchen uses it (continuous t, clamped alpha_bar).

    ``shift`` > 1 moves every t towards more noise in logSNR space (StableCascade: ``logSNR += 2·log(1/shift)``,
    clamped to the unshifted range); the network is then conditioned on the t of the *shifted* logSNR
    (``noise_cond``). ``shift = 1`` is Würstchen v2 and leaves every value bit-identical to diffusers'
    ``DDPMWuerstchenScheduler``.
    """

    s: float = 0.008
    clamp_min: float = 1e-4
    clamp_max: float = 0.9999
    shift: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.clamp_min < self.clamp_max < 1.0:
            raise ValueError(f"need 0 < clamp_min < clamp_max < 1, got {self.clamp_min}, {self.clamp_max}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def _s(self, t: Tensor) -> Tensor:
        # s as a 1-element float32 tensor, exactly as diffusers holds it, so that (t+s)/(1+s) rounds identically;
        # torch.full fills on the device (no host-to-device copy, hence no sync inside the sampling loop).
        return torch.full((1,), self.s, dtype=torch.float32, device=t.device)

    def _alpha_bar_unshifted(self, t: Tensor) -> Tensor:
        s = self._s(t)
        start = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
        ab = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / start
        return ab.clamp(self.clamp_min, self.clamp_max)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """Signal fraction ``alpha_bar(t)`` (float32), same shape as ``t``."""
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.shift == 1.0:
            return self._alpha_bar_unshifted(t).reshape(t.shape)
        return torch.sigmoid(self.log_snr(t))

    def log_snr(self, t: Tensor) -> Tensor:
        """``log(alpha_bar / (1 - alpha_bar))`` including the shift, clamped to the unshifted range."""
        t = torch.as_tensor(t, dtype=torch.float32)
        ab = self._alpha_bar_unshifted(t).reshape(t.shape)
        logsnr = torch.log(ab / (1 - ab))
        if self.shift != 1.0:
            lo = math.log(self.clamp_min / (1 - self.clamp_min))
            hi = math.log(self.clamp_max / (1 - self.clamp_max))
            logsnr = (logsnr + 2 * math.log(1 / self.shift)).clamp(lo, hi)
        return logsnr

    def noise_cond(self, t: Tensor) -> Tensor:
        """The ``r`` the network sees at time ``t``: ``t`` itself, or with a shift the t whose unshifted
        alpha_bar equals the shifted one (GDF ``CosineTNoiseCond``, the inverse of the cosine)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.shift == 1.0:
            return t
        s = self.s
        start = math.cos(s / (1 + s) * math.pi * 0.5) ** 2
        ab = torch.sigmoid(self.log_snr(t)).clamp(0, 1)
        return torch.acos(torch.sqrt(ab * start).clamp(-1, 1)) / (math.pi * 0.5) * (1 + s) - s


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample (B,) values broadcast over the remaining dims of ``like``."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def diffuse(x0: Tensor, t: Tensor, noise: Tensor, schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """Forward noising ``x_t = sqrt(ab)·x0 + sqrt(1-ab)·noise`` (paper §3.2); ``t`` has shape (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    ab = _expand(schedule.alpha_bar(t).to(x0.device), x0)
    return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)


def predict_x0(x_t: Tensor, eps: Tensor, t: Tensor, schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """Invert ``diffuse`` for a predicted noise: ``x0 = (x_t - sqrt(1-ab)·eps) / sqrt(ab)``."""
    ab = _expand(schedule.alpha_bar(t).to(x_t.device), x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def sample_t(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
             kind: str = "stretched") -> Tensor:
    """Training-time t, shape (batch,).

    ``stretched`` (as released, docs/reference.md#released-objective): ``((1-U)·1.08 + 0.001).clamp(0.001, 1)``,
    which puts 7.5 % of the samples at exactly t = 1 (pure noise). ``uniform`` (StableCascade):
    ``((1-U) + 0.001).clamp(0.001, 1)``.
    """
    if kind not in T_SAMPLERS:
        raise ValueError(f"t sampler must be one of {T_SAMPLERS}, got {kind!r}")
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    stretch = 1.08 if kind == "stretched" else 1.0
    return ((1 - u) * stretch + 0.001).clamp(0.001, 1.0).to(device)


def loss_weight(t: Tensor, kind: str = "p2", schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """Per-sample loss weight, shape of ``t``.

    ``p2`` = ``1 - alpha_bar`` = ``1/(1+SNR)``: Choi et al.'s P2 with k = gamma = 1, as the released code computes it
    (docs/reference.md#released-objective). ``p2_paper`` = ``(1 - alpha_bar)/(1 + alpha_bar)``: the form the paper
    *prints* in §3.2; it disagrees with the code (it halves the weight near t = 0), so it is kept as an ablation.
    ``constant`` = 1 (plain eps-MSE, DDPM's "simple" loss).
    """
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"loss weight must be one of {LOSS_WEIGHTS}, got {kind!r}")
    ab = schedule.alpha_bar(t)
    if kind == "p2":
        return 1 - ab
    if kind == "p2_paper":
        return (1 - ab) / (1 + ab)
    return torch.ones_like(ab)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def training_target(x0: Tensor, noise: Tensor, t: Tensor, target: str = "eps",
                    schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """What a network trained on ``target`` should output for ``x_t = diffuse(x0, t, noise)``; ``t`` has shape (B,).

    ``eps``: ``noise`` itself (the same tensor, so the released loss is computed exactly as before);
    ``v``: ``sqrt(ab)·noise - sqrt(1-ab)·x0``; ``x0``: ``x0`` itself.
    """
    _check_target(target)
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    ab = _expand(schedule.alpha_bar(t).to(x0.device), x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def output_to_eps(out: Tensor, x_t: Tensor, t: Tensor, target: str = "eps",
                  schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """A network output under ``target`` as a noise estimate at ``(x_t, t)``.

    ``v``: ``eps = sqrt(ab)·v + sqrt(1-ab)·x_t``; ``x0``: ``eps = (x_t - sqrt(ab)·x0) / sqrt(1-ab)`` (ill-conditioned
    near t = 0, where ``1 - ab`` -> 1e-4); ``eps``: ``out`` unchanged.
    """
    _check_target(target)
    if target == "eps":
        return out
    ab = _expand(schedule.alpha_bar(t).to(x_t.device), x_t)
    if target == "v":
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t
    return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()


def output_to_x0(out: Tensor, x_t: Tensor, t: Tensor, target: str = "eps",
                 schedule: CosineSchedule = CosineSchedule()) -> Tensor:
    """A network output under ``target`` as a data estimate at ``(x_t, t)``.

    ``eps``: ``predict_x0`` (ill-conditioned near t = 1, where ``ab`` -> 1e-4); ``v``: ``x0 = sqrt(ab)·x_t -
    sqrt(1-ab)·v``; ``x0``: ``out`` unchanged.
    """
    _check_target(target)
    if target == "eps":
        return predict_x0(x_t, out, t, schedule)
    if target == "x0":
        return out
    ab = _expand(schedule.alpha_bar(t).to(x_t.device), x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out


@dataclass(frozen=True)
class Diffusion:
    """Schedule + training target + loss weight + training t sampler: the whole training objective of Stage B and
    Stage C, each part chosen independently (StableCascade GDF style). The defaults are Würstchen v2's.

    ``loss(model_fn, x0, *cond, **cond_kw)`` draws ``t`` then ``noise`` from ``generator`` (in that order), noises
    ``x0``, calls ``model_fn(x_t, r, *cond, **cond_kw)`` (``r = schedule.noise_cond(t)``) and returns the per-sample
    weighted MSE to ``training_target`` (the noise for ``eps``), shape (B,): take ``.mean()`` for the batch loss.
    To sample a network trained on another target, wrap it with ``samplers.eps_denoiser``.
    """

    schedule: CosineSchedule = CosineSchedule()
    weight: str = "p2"
    t_sampler: str = "stretched"
    target: str = "eps"  # last, so positional construction of the earlier fields keeps working

    def __post_init__(self) -> None:
        if self.weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss weight must be one of {LOSS_WEIGHTS}, got {self.weight!r}")
        if self.t_sampler not in T_SAMPLERS:
            raise ValueError(f"t sampler must be one of {T_SAMPLERS}, got {self.t_sampler!r}")
        _check_target(self.target)

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        return sample_t(batch, generator, device, self.t_sampler)

    def diffuse(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return diffuse(x0, t, noise, self.schedule)

    def loss_weight(self, t: Tensor) -> Tensor:
        return loss_weight(t, self.weight, self.schedule)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return training_target(x0, noise, t, self.target, self.schedule)

    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return output_to_eps(out, x_t, t, self.target, self.schedule)

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return output_to_x0(out, x_t, t, self.target, self.schedule)

    def loss(self, model_fn: Callable[..., Tensor], x0: Tensor, *cond: Any, generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None, **cond_kw: Any) -> Tensor:
        """Per-sample ``weight(t) · mean((model_fn(x_t, r, ...) - target)²)``; ``t``/``noise`` override the draws."""
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, generator, x0.device)
        t = t.to(device=x0.device, dtype=torch.float32)
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x_t = self.diffuse(x0, t, noise)
        pred = model_fn(x_t, self.schedule.noise_cond(t).to(x0.device), *cond, **cond_kw)
        if pred.shape != noise.shape:
            raise ValueError(f"model output {tuple(pred.shape)} does not match the noise {tuple(noise.shape)}")
        target = self.training_target(x0, noise, t)  # `noise` itself for eps: the released floats, unchanged
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return mse * self.loss_weight(t).to(mse.device)
