"""Bootstrap confidence intervals with fixed seeds (every metric in the evaluation carries one).

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the evaluation units with replacement,
recompute the statistic, take the ``(1-level)/2`` and ``(1+level)/2`` quantiles. The units are prompts for
paired metrics (preference, CLIP score, compositional accuracy) and images of each set, resampled
independently, for set metrics (FID, KID, IS). Resampling duplicates images, which shifts set metrics (two
resamples of one set have FID > 0; IS drops); ``bias_correct`` moves the percentile interval by the bootstrap
bias ``mean(draws) - value`` so that it is centred on the estimate (Efron & Tibshirani §10.6).

Comparisons of two systems on the same prompts and noise: :func:`paired_difference` (one seed) and
:func:`pooled_paired_difference` / :func:`pooled_over_seeds` (several seeds, the seed spread in the interval).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """A metric value with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n: int = 0  # number of evaluation units (prompts or images) behind ``value``

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap(statistic: Callable[..., float], *sizes: int, n_boot: int = 200, level: float = 0.95,
              seed: int = 0, bias_correct: bool = False, keep_infinite: bool = False) -> Estimate:
    """Percentile-bootstrap CI of ``statistic(idx_1, ..., idx_k)`` over ``k`` independent samples.

    ``statistic`` receives one index tensor per sample (``sizes[i]`` indices into sample ``i``); the point
    value is the statistic on the unresampled data (``arange`` indices). The generator is local, so the
    global torch RNG is untouched and the same seed gives the same interval. Non-finite draws are dropped, unless
    ``keep_infinite``: then every draw counts and the bounds are nearest-rank percentiles, so that a statistic
    that can be +inf (a threshold never reached) leaves the interval open on that side.
    """
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"bootstrap needs at least one non-empty sample, got sizes {sizes}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    value = float(statistic(*(torch.arange(s) for s in sizes)))
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_boot):
        draws.append(float(statistic(*(torch.randint(0, s, (s,), generator=gen) for s in sizes))))
    if keep_infinite:
        ranked = sorted(draws)
        return Estimate(value, ranked[math.floor(n_boot * (1 - level) / 2)],
                        ranked[math.ceil(n_boot * (1 + level) / 2) - 1], level, sizes[0])
    finite = torch.tensor([d for d in draws if math.isfinite(d)], dtype=torch.float64)
    if finite.numel() == 0:
        return Estimate(value, math.nan, math.nan, level, sizes[0])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(finite, q).tolist()
    if bias_correct:
        shift = finite.mean().item() - value
        low, high = low - shift, high - shift
    return Estimate(value, low, high, level, sizes[0])


def mean_ci(values: Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0, scale: float = 1.0) -> Estimate:
    """Mean of per-unit ``values`` (e.g. per-prompt 0/0.5/1 wins) times ``scale``, with its bootstrap CI."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("mean_ci needs at least one value")
    return bootstrap(lambda idx: scale * values[idx].mean().item(), values.numel(), n_boot=n_boot,
                     level=level, seed=seed)


# ---- paired comparisons and seed pooling (issue 20) --------------------------------------------------------

def _finite(values: Tensor | Sequence[float], what: str) -> Tensor:
    # a NaN would make every resample NaN and the interval silently empty
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be non-empty and finite")
    return t


def paired_difference(a: Tensor | Sequence[float], b: Tensor | Sequence[float], n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over prompts, two systems scored on the same prompts with the same initial noise, with a
    paired bootstrap CI: one resample of prompt indices serves both arms, so prompt difficulty cancels."""
    a, b = _finite(a, "a"), _finite(b, "b")
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"paired arms need two (P,) vectors of equal length, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    diff = a - b  # resampling prompts of the difference is resampling both arms with the same indices
    return bootstrap(lambda idx: diff[idx].mean().item(), diff.numel(), n_boot=n_boot, level=level, seed=seed)


def pooled_over_seeds(values: Tensor | Sequence[Sequence[float]], n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Mean of ``values`` (S seeds, P prompts; the same prompts under every seed) with a CI that carries both the
    prompt-to-prompt and the seed-to-seed spread.

    Rule: the pigeonhole bootstrap (Owen 2007) for a crossed design: each resample draws S seed indices and P
    prompt indices independently, with replacement, and averages the S x P sub-table. One seed cannot show its
    spread, so fewer than two seeds are refused (use :func:`mean_ci` or :func:`paired_difference` there).
    """
    v = _finite(values, "values")
    if v.dim() != 2 or v.shape[0] < 2:
        raise ValueError(f"values must be (seeds, prompts) with at least 2 seeds, got shape {tuple(v.shape)}")
    est = bootstrap(lambda s_idx, p_idx: v[s_idx][:, p_idx].mean().item(), v.shape[0], v.shape[1],
                    n_boot=n_boot, level=level, seed=seed)
    return replace(est, n=v.numel())  # n: every (seed, prompt) image behind the mean


def pooled_paired_difference(a: Tensor | Sequence[Sequence[float]], b: Tensor | Sequence[Sequence[float]],
                             n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """:func:`paired_difference` over several seeds: ``a``, ``b`` are (S, P), arm A and arm B with the same
    prompts and the same initial noise per seed; the CI is :func:`pooled_over_seeds` of ``a - b``."""
    a, b = _finite(a, "a"), _finite(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arms need equal (seeds, prompts) shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return pooled_over_seeds(a - b, n_boot=n_boot, level=level, seed=seed)
