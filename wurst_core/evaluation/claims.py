"""The paper's claims as decision rules fixed before measuring, each verdict computed from a confidence interval; a
claim with no measurement yet says what will measure it and has the verdict "not measured yet"."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import pandas as pd

from .stats import Estimate

Verdict = Literal["supported", "refuted", "inconclusive at this scale", "not measured yet"]
SUPPORTED: Verdict = "supported"
REFUTED: Verdict = "refuted"
INCONCLUSIVE: Verdict = "inconclusive at this scale"
NOT_MEASURED: Verdict = "not measured yet"
DIRECTIONS = ("higher", "lower")
NO_RULE = "no rule yet: it is stated with the measurement, before any result is read"


@dataclass(frozen=True)
class Claim:
    """One claim: its name, the paper's figure as printed, the measured estimate, and the rule stated up front.

    The claim holds for a value beyond ``bound = reference + margin`` (``direction="higher"``) or
    ``reference - margin`` (``"lower"``), strictly. ``reference`` is the no-effect value (0 for a difference,
    50 for a win rate in %); ``margin`` >= 0 is the smallest effect that counts as support. ``level``: the interval's
    confidence level, part of the rule (a measurement at another level is refused).

    ``measure`` says in words what ``measured`` is (or, without a measurement, what will measure the claim). A claim
    is stated before it is measured: ``measured=None`` gives the verdict "not measured yet", with the rule already
    fixed, or with ``direction=None`` when no rule is fixed yet (``dataclasses.replace`` adds the measurement later).

    ``precondition``, stated with the rule, says in words what must hold for the measurement to be judged at all (a
    decoder that reconstructs, a measure off its floor); a measured claim with one says whether it held
    (``precondition_met``), and where it did not the verdict is "inconclusive at this scale", whatever the interval.
    """

    name: str
    paper: str
    measured: Estimate | None = None
    direction: Literal["higher", "lower"] | None = "higher"
    reference: float = 0.0
    margin: float = 0.0
    level: float = 0.95
    measure: str = ""
    precondition: str = ""
    precondition_met: bool | None = None

    def __post_init__(self) -> None:
        # a rule that cannot be read unambiguously must fail when stated, not when judged
        if self.direction not in DIRECTIONS + (None,):
            raise ValueError(f"direction must be one of {DIRECTIONS} (or None: no rule yet), got {self.direction!r}")
        if not (math.isfinite(self.reference) and math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"need a finite reference and a finite margin >= 0, got {self.reference}, {self.margin}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.measured is None:
            if not self.measure:
                raise ValueError(f"claim {self.name!r} has no measurement: `measure` must say what will measure it")
            return
        if not isinstance(self.measured, Estimate):
            raise TypeError(f"measured must be an Estimate or None, got {type(self.measured).__name__}")
        if self.direction is None:
            raise ValueError(f"claim {self.name!r} is measured but has no rule (direction None)")
        if self.measured.level != self.level:
            raise ValueError(f"the rule reads a {self.level:g} interval, the measurement has level "
                             f"{self.measured.level:g}")
        if self.precondition and self.precondition_met is None:
            raise ValueError(f"claim {self.name!r} is measured: say whether its precondition held "
                             f"(precondition_met), {self.precondition!r}")

    @property
    def bound(self) -> float:
        return self.reference + self.margin if self.direction == "higher" else self.reference - self.margin

    @property
    def rule(self) -> str:
        """The decision rule in words, as it appears in :func:`claims_table` (:data:`NO_RULE` without a direction)."""
        if self.direction is None:
            return NO_RULE
        side = ">" if self.direction == "higher" else "<"
        other = "<=" if self.direction == "higher" else ">="
        level = f"{100 * self.level:g}% CI"
        rule = (f"claim holds for values {side} {self.bound:g} (reference {self.reference:g}, margin "
                f"{self.margin:g}): supported if the whole {level} is {side} {self.bound:g}, refuted if the whole "
                f"{level} is {other} {self.bound:g}, else inconclusive")
        return f"{rule}; judged only if {self.precondition}, else inconclusive" if self.precondition else rule


def verdict(claim: Claim) -> Verdict:
    """Supported if every value of the interval satisfies the claim, refuted if none does, inconclusive otherwise
    (also for an undefined interval or a precondition that did not hold); "not measured yet" without a
    measurement."""
    if claim.measured is None:
        return NOT_MEASURED
    if claim.precondition and not claim.precondition_met:
        return INCONCLUSIVE
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


COLUMNS = ["claim", "paper", "measurement", "measured", "rule", "verdict"]


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per claim: claim, paper, measurement (what is measured), measured (``value [low, high]``, or "-"),
    rule, verdict."""
    if not claims:
        raise ValueError("claims_table needs at least one claim")
    rows = [{"claim": c.name, "paper": c.paper, "measurement": c.measure,
             "measured": "-" if c.measured is None else str(c.measured), "rule": c.rule, "verdict": verdict(c)}
            for c in claims]
    return pd.DataFrame.from_records(rows, columns=COLUMNS)
