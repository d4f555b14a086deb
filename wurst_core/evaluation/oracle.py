"""An oracle judge from exact attribute checks (the image with more correct attributes wins) and judge agreement."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .probe import CompositionalResult, ProbeSpec, scene_checks
from .stats import Estimate, mean_ci

# cell_iou is partial credit for what "position" already checks; counting it too would weigh position twice
PARTIAL_CHECKS = ("cell_iou",)

Checks = CompositionalResult | Mapping[str, Tensor] | Sequence[Mapping[str, float]]


def attribute_scores(checks: Checks, keys: Sequence[str] | None = None) -> Tensor:
    """Per image, the number of attribute checks passed (``scene_checks``' binary checks: count, position,
    background, each object field, and all_correct for binding), shape (P,).

    ``checks``: per-scene dicts of :func:`scene_checks`, or ``{check: (P,)}`` as in ``CompositionalResult.checks``,
    or a :class:`CompositionalResult`. ``keys`` picks the checks to count (default: all but ``cell_iou``).
    """
    if isinstance(checks, CompositionalResult):
        checks = checks.checks
    if isinstance(checks, Mapping):
        table = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in checks.items()}
    else:
        rows = list(checks)
        if not rows:
            raise ValueError("need the checks of at least one image")
        table = {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in rows[0]}
    names = [k for k in table if k not in PARTIAL_CHECKS] if keys is None else list(keys)
    missing = [k for k in names if k not in table]
    if not names or missing:
        raise ValueError(f"checks to count must be non-empty and present; missing {missing} of {list(table)}")
    return torch.stack([table[k] for k in names]).sum(0)


def oracle_outcomes(checks_a: Checks, checks_b: Checks, keys: Sequence[str] | None = None) -> Tensor:
    """Per prompt, A's image against B's (same prompt): 1 if A passes more attribute checks, 0 if fewer, 0.5 if
    as many; the same 1/0.5/0 form as ``preference.pairwise_outcomes``."""
    sa, sb = attribute_scores(checks_a, keys), attribute_scores(checks_b, keys)
    if sa.shape != sb.shape:
        raise ValueError(f"both arms need checks on the same prompts, got {sa.numel()} and {sb.numel()} images")
    return torch.where(sa == sb, 0.5, (sa > sb).double())


def oracle_scene_outcomes(predicted_a: Sequence[Mapping[str, Any]], predicted_b: Sequence[Mapping[str, Any]],
                          truths: Sequence[Mapping[str, Any]], spec: ProbeSpec) -> Tensor:
    """:func:`oracle_outcomes` from scenes read off the two arms' images (``AttributeProbe.predict``) and the
    prompts' ground truth."""
    if not (len(predicted_a) == len(predicted_b) == len(truths)) or not truths:
        raise ValueError(f"need one scene per prompt in each arm, got {len(predicted_a)}, {len(predicted_b)} "
                         f"and {len(truths)} truths")
    checks_a = [scene_checks(p, t, spec) for p, t in zip(predicted_a, truths)]
    checks_b = [scene_checks(p, t, spec) for p, t in zip(predicted_b, truths)]
    return oracle_outcomes(checks_a, checks_b)


def pairwise_agreement(outcomes_a: Tensor, outcomes_b: Tensor) -> Tensor:
    """Per prompt, ``1 - |a - b|`` for two judges' outcomes in [0, 1]: 1 for the same winner (or both a tie),
    0 for opposite winners, 0.5 when one judge calls a tie (ties count half)."""
    a = torch.as_tensor(outcomes_a, dtype=torch.float64)
    b = torch.as_tensor(outcomes_b, dtype=torch.float64)
    if a.dim() != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"need two non-empty (P,) outcome vectors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if bool(((a < 0) | (a > 1) | (b < 0) | (b > 1) | a.isnan() | b.isnan()).any()):
        raise ValueError("outcomes must lie in [0, 1] (1: A preferred, 0.5: tie, 0: B preferred)")
    return 1.0 - (a - b).abs()


def judge_agreement(judge_a: Tensor, judge_b: Tensor, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """How often (%) two judges pick the same winner on the same pairs, ties counting half
    (:func:`pairwise_agreement`), with a bootstrap CI over prompts. ``judge_a``/``judge_b``: per-prompt outcomes,
    e.g. :func:`oracle_outcomes` and ``pairwise_outcomes`` of PickScore."""
    return mean_ci(pairwise_agreement(judge_a, judge_b), n_boot=n_boot, seed=seed, scale=100.0)
