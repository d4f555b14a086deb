"""Bradley–Terry strengths with ties, and their intervals from a bootstrap that resamples raters.

Ties follow Davidson (1970): ``P(i) : P(tie) : P(j) = pi_i : nu sqrt(pi_i pi_j) : pi_j``. Given that a judgment is
decisive, Davidson's model is exactly Bradley–Terry (``pi_i / (pi_i + pi_j)``), so the strengths are fitted with
``choix`` (its iterative Luce spectral ranking, the maximum-likelihood estimate) on the decisive judgments, and the
tie parameter ``nu`` by maximum likelihood given those strengths. Strengths are natural-log scale, centred on zero;
the gap ``theta_i - theta_j`` is the log-odds that i is chosen over j in a decisive judgment.

Every ordered pair gets ``PRIOR`` pseudo-wins (half a win each way): the estimate exists when a system never wins in
a resample, and moves by far less than its interval in a study of any useful size.

The bootstrap resamples raters (all of a rater's judgments go together: judgments of one person are not independent)
with multinomial weights on per-rater win matrices, and refits every resample at once with the MM algorithm
(Hunter 2004) vectorised over resamples (and over studies, for coverage checks); :func:`fit_many` converges to the
same maximum as ``choix`` (tested). Intervals are percentile intervals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import choix
import numpy as np
import pandas as pd

PRIOR = 0.5  # pseudo-wins per ordered pair of systems


def _with_prior(wins: np.ndarray, prior: float) -> np.ndarray:
    s = wins.shape[-1]
    return wins + prior * (1 - np.eye(s))


def fit(wins: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """Centred log-strengths from a decisive-wins matrix ``wins[i, j]`` (i chosen over j), fitted by ``choix``."""
    wins = np.asarray(wins, dtype=np.float64)
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1] or wins.shape[0] < 2:
        raise ValueError(f"wins must be a square matrix of at least two systems, got shape {wins.shape}")
    if (wins < 0).any() or not np.isfinite(wins).all():
        raise ValueError("wins must be finite counts >= 0")
    theta = choix.ilsr_pairwise_dense(_with_prior(wins, prior), alpha=0.0, max_iter=1000, tol=1e-12)
    return theta - theta.mean()


def fit_many(wins: np.ndarray, prior: float = PRIOR, max_iter: int = 5000, tol: float = 1e-10) -> np.ndarray:
    """:func:`fit` for a stack of matrices ``(..., S, S)`` at once (MM iterations), returning ``(..., S)``."""
    w = _with_prior(np.asarray(wins, dtype=np.float64), prior)
    total = w.sum(-1)                      # W_i: wins of i
    n = w + np.swapaxes(w, -1, -2)         # N_ij: decisive comparisons of i and j
    pi = np.ones(w.shape[:-1])
    for _ in range(max_iter):
        denom = (n / (pi[..., :, None] + pi[..., None, :])).sum(-1)
        new = total / denom
        new /= np.exp(np.log(new).mean(-1, keepdims=True))
        done = np.abs(np.log(new) - np.log(pi)).max() < tol
        pi = new
        if done:
            break
    theta = np.log(pi)
    return theta - theta.mean(-1, keepdims=True)


def davidson_nu(theta: np.ndarray, wins: np.ndarray, ties: np.ndarray) -> float:
    """Davidson's tie parameter by maximum likelihood given the strengths; ``ties`` is symmetric (each tie of i and j
    counted in ``[i, j]`` and ``[j, i]``). NaN without judgments."""
    pi = np.exp(theta)
    iu = np.triu_indices(len(theta), 1)
    t = ties[iu]
    w_ij, w_ji = wins[iu], wins.T[iu]
    if t.sum() + w_ij.sum() + w_ji.sum() == 0:
        return float("nan")
    if t.sum() == 0:
        return 0.0
    root = np.sqrt(pi[:, None] * pi[None, :])[iu]
    s, n = pi[iu[0]] + pi[iu[1]], t + w_ij + w_ji
    # the log-likelihood is concave in x = log(nu): bisect its derivative T - sum n r e^x / (s + r e^x)
    lo, hi = -30.0, 30.0
    for _ in range(200):
        x = (lo + hi) / 2
        if t.sum() - (n * root * np.exp(x) / (s + root * np.exp(x))).sum() > 0:
            lo = x
        else:
            hi = x
    return float(np.exp((lo + hi) / 2))


def rater_weights(n_raters: int, n_boot: int, rng: np.random.Generator, lead: tuple[int, ...] = ()) -> np.ndarray:
    """Bootstrap weights ``(*lead, n_boot, n_raters)``: how often each rater is drawn in each resample."""
    return rng.multinomial(n_raters, np.full(n_raters, 1.0 / n_raters), size=(*lead, n_boot)).astype(np.float64)


def bootstrap_strengths(per_rater_wins: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        prior: float = PRIOR) -> np.ndarray:
    """Resampled strengths ``(..., n_boot, S)`` from per-rater wins ``(..., R, S, S)`` (leading axes: studies)."""
    w = np.asarray(per_rater_wins, dtype=np.float64)
    rng = np.random.default_rng([seed, 11])
    weights = rater_weights(w.shape[-3], n_boot, rng, w.shape[:-3])
    resampled = np.einsum("...br,...rij->...bij", weights, w)
    return fit_many(resampled, prior)


def percentile(draws: np.ndarray, level: float = 0.95, axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
    q = (1 - level) / 2
    return np.quantile(draws, q, axis=axis), np.quantile(draws, 1 - q, axis=axis)


@dataclass
class BTResult:
    """Strengths, their rater-bootstrap intervals, gaps and Davidson's tie parameter."""

    systems: list[str]
    theta: np.ndarray
    low: np.ndarray
    high: np.ndarray
    draws: np.ndarray
    nu: float
    wins: np.ndarray
    ties: np.ndarray
    n_raters: int
    level: float = 0.95
    truth: dict[str, dict[str, float]] = field(default_factory=dict)  # simulated: name -> {system: strength}

    def gap(self, a: str, b: str) -> tuple[float, float, float]:
        """``theta_a - theta_b`` with its percentile interval."""
        i, j = self.systems.index(a), self.systems.index(b)
        d = self.draws[:, i] - self.draws[:, j]
        lo, hi = percentile(d, self.level, axis=0)
        return float(self.theta[i] - self.theta[j]), float(lo), float(hi)

    def table(self, reference: str | None = None) -> pd.DataFrame:
        ref = reference or self.systems[0]
        rows = []
        for k, s in enumerate(self.systems):
            g, lo, hi = self.gap(s, ref)
            row = {"system": s, "strength": self.theta[k], "strength_low": self.low[k], "strength_high": self.high[k],
                   f"gap_to_{ref}": g, "gap_low": lo, "gap_high": hi,
                   "decisive_wins": int(round(self.wins[k].sum())),
                   "decisive_losses": int(round(self.wins[:, k].sum())),
                   "ties": int(round(self.ties[k].sum()))}
            for name, strengths in self.truth.items():
                truth = {x: v - np.mean(list(strengths.values())) for x, v in strengths.items()}
                row[f"{name}_strength"] = truth.get(s, np.nan)
                row[f"{name}_gap"] = truth.get(s, np.nan) - truth.get(ref, np.nan)
            rows.append(row)
        return pd.DataFrame(rows)


def bradley_terry(per_rater_wins: np.ndarray, per_rater_ties: np.ndarray, systems: Sequence[str],
                  n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> BTResult:
    """The fit (choix) on the pooled judgments and its rater-bootstrap intervals (``(R, S, S)`` inputs)."""
    wins, ties = per_rater_wins.sum(0), per_rater_ties.sum(0)
    if per_rater_wins.shape[0] < 1:
        raise ValueError("Bradley–Terry needs judgments of at least one rater")
    theta = fit(wins)
    draws = bootstrap_strengths(per_rater_wins, n_boot, seed)
    low, high = percentile(draws, level, axis=0)
    return BTResult(list(systems), theta, low, high, draws, davidson_nu(theta, wins, ties), wins, ties,
                    per_rater_wins.shape[0], level)
