"""The paper's claims as decision rules fixed before measuring, each verdict computed from a confidence interval."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import pandas as pd

from .stats import Estimate

Verdict = Literal["supported", "refuted", "inconclusive at this scale"]
SUPPORTED: Verdict = "supported"
REFUTED: Verdict = "refuted"
INCONCLUSIVE: Verdict = "inconclusive at this scale"
DIRECTIONS = ("higher", "lower")


@dataclass(frozen=True)
class Claim:
    """One claim: its name, the paper's figure as printed, the measured estimate, and the rule stated up front.

    The claim holds for a value beyond ``bound = reference + margin`` (``direction="higher"``) or
    ``reference - margin`` (``"lower"``), strictly. ``reference`` is the no-effect value (0 for a difference,
    50 for a win rate in %); ``margin`` >= 0 is the smallest effect that counts as support.
    """

    name: str
    paper: str
    measured: Estimate
    direction: Literal["higher", "lower"] = "higher"
    reference: float = 0.0
    margin: float = 0.0

    def __post_init__(self) -> None:
        # a rule that cannot be read unambiguously must fail when stated, not when judged
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not (math.isfinite(self.reference) and math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"need a finite reference and a finite margin >= 0, got {self.reference}, {self.margin}")
        if not isinstance(self.measured, Estimate):
            raise TypeError(f"measured must be an Estimate, got {type(self.measured).__name__}")

    @property
    def bound(self) -> float:
        return self.reference + self.margin if self.direction == "higher" else self.reference - self.margin

    @property
    def rule(self) -> str:
        """The decision rule in words, as it appears in :func:`claims_table`."""
        side = ">" if self.direction == "higher" else "<"
        other = "<=" if self.direction == "higher" else ">="
        level = f"{100 * self.measured.level:g}% CI"
        return (f"claim holds for values {side} {self.bound:g} (reference {self.reference:g}, margin "
                f"{self.margin:g}): supported if the whole {level} is {side} {self.bound:g}, refuted if the whole "
                f"{level} is {other} {self.bound:g}, else inconclusive")


def verdict(claim: Claim) -> Verdict:
    """Supported if every value of the interval satisfies the claim, refuted if none does, inconclusive otherwise
    (also for an undefined interval)."""
    low, high = claim.measured.low, claim.measured.high
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    # for "lower", mirror the interval so that one comparison serves both directions
    lo, hi, bound = (low, high, claim.bound) if claim.direction == "higher" else (-high, -low, -claim.bound)
    if lo > bound:
        return SUPPORTED
    if hi <= bound:
        return REFUTED
    return INCONCLUSIVE


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per claim: claim, paper, measured (``value [low, high]``), rule, verdict."""
    if not claims:
        raise ValueError("claims_table needs at least one claim")
    rows = [{"claim": c.name, "paper": c.paper, "measured": str(c.measured), "rule": c.rule, "verdict": verdict(c)}
            for c in claims]
    return pd.DataFrame.from_records(rows, columns=["claim", "paper", "measured", "rule", "verdict"])
