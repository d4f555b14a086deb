"""The paper's claims as notebook 07 states and measures them (issue 20): one :class:`Claim` each, its decision rule
fixed here, before any result is read, and printed by the notebook before its results.

Measured by 07 when a finished ``08_baseline`` run exists: "at equal training compute, Würstchen beats the baseline
LDM" (Tables 1 and 2), three ways, each with its own verdict: prompt adherence (the paired difference in all-correct
compositional accuracy, in points), preference (the judge CLIP's PickScore-procedure win rate of Würstchen, ties
half) and image quality (the baseline's KID_tiny minus Würstchen's, paired by prompt). Every system samples prompt i
from the same seed; each is pooled over the baseline's training seeds (the interval carries the seed-to-seed spread;
with one seed, that seed's estimate). Beside them, per seed and pooled: the paired difference in cell IoU, the oracle
judge's win rate and how often the two judges agree. 07 also measures the same adherence row at Stage B + C's budget
(from an 08 run at ``budget="stage_bc"``), inference speed (:func:`speed_ratio`) and training cost
(:func:`matching_budget` over 08's snapshots); the ablation claims come from notebooks 09 and 10
(:func:`claim_from_run`). A claim without its measurement says "not measured yet" and what will measure it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..evaluation.claims import Claim, verdict
from ..evaluation.oracle import oracle_outcomes, pairwise_agreement
from ..evaluation.preference import pairwise_outcomes
from ..evaluation.stats import (Estimate, bootstrap, mean_ci, paired_difference, pooled_over_seeds,
                                pooled_paired_difference)

MIN_BOOT = 1000  # paired intervals take at least this many resamples (issue 20), whatever the profile's n_boot

EQUAL_COMPUTE = Claim(
    "At equal training compute, Würstchen beats the baseline LDM: prompt adherence",
    paper="Table 1: PickScore prefers Würstchen over the Baseline LDM on 96.5 % (COCO-30K), 96.6 % (Localized "
          "Narratives-COCO-5K) and 98.6 % (Parti-prompts) of prompts; Table 2: FID 23.6 against 43.5, IS 40.9 "
          "against 20.1; Baseline LDM ≈25,000 A100 hours, Stage C 24,602",
    direction="higher", reference=0.0, margin=0.0,
    measure="all-correct compositional accuracy (probe), Würstchen minus the baseline LDM in percentage points, "
            "paired on the held-out prompts, pooled over the baseline's training seeds (notebook 08, trained at "
            "Stage C's training FLOPs)")

PREFERENCE = Claim(
    "At equal training compute, Würstchen beats the baseline LDM: preference (Table 1)",
    paper="Table 1: PickScore prefers Würstchen over the Baseline LDM on 96.5 % (COCO-30K), 96.6 % (Localized "
          "Narratives-COCO-5K) and 98.6 % (Parti-prompts) of prompts",
    direction="higher", reference=50.0, margin=0.0,
    measure="the PickScore procedure with the tiny judge CLIP: % of held-out prompts on which Würstchen's image is "
            "preferred over the baseline's (ties half), pooled over the baseline's training seeds")
QUALITY = Claim(
    "At equal training compute, Würstchen beats the baseline LDM: image quality (Table 2)",
    paper="Table 2: FID 23.6 (Würstchen) against 43.5 (Baseline LDM); IS 40.9 against 20.1",
    direction="higher", reference=0.0, margin=0.0,
    measure="KID_tiny of the baseline minus KID_tiny of Würstchen (probe features, full-set unbiased MMD²; "
            "positive: Würstchen closer to the real images), paired by prompt, pooled over the baseline's seeds")
MEASURED = (EQUAL_COMPUTE, PREFERENCE, QUALITY)  # what 07 measures against the baseline, by headline key
EQUAL_COMPUTE_BC = dataclasses.replace(
    EQUAL_COMPUTE, name="At Stage B + C's training compute, Würstchen beats the baseline LDM: prompt adherence",
    measure="as the first row, against a baseline trained at Stage B's plus Stage C's training FLOPs (Würstchen's "
            "whole recipe above Stage A; `wurst run 08_baseline -p budget stage_bc -p stage_c_seeds ''`, not run by "
            "`make reproduce`: 1.5x the first row's baseline training on tiny)")
HEADLINES = {EQUAL_COMPUTE.name: "all_correct_diff", PREFERENCE.name: "judge_win", QUALITY.name: "kid_diff"}

LATER: tuple[Claim, ...] = (
    Claim("The strongly compressed latent keeps the image's semantics",
          paper="Abstract, §3.1: Stage B rebuilds the image from the Semantic Compressor's 42:1 map (16 x 24 x 24 "
                "at 1024 px); §3.4: further compression harmed quality (no figure)",
          direction=None,
          measure="compression-ratio ablation: Stage B reconstruction from the compressed map with an empty caption "
                  "against the caption, at three Stage C latent sizes (e.g. 8x8, 4x4, 2x2 at 64 px)"),
    Claim("The A/B objective stabilises training",
          paper="§3.2: the A/B formulation 'made the training more stable' (no figure)",
          direction=None,
          measure="objective ablation: Stage C with the A/B, eps and v heads (p2 weighting) at equal steps: loss by "
                  "noise level, gradient-norm spikes, a stress run without clipping at a higher learning rate"),
    Claim("p2 loss weighting helps",
          paper="§3.2: p2 weighting (Choi et al. 2022) makes higher noise levels contribute more (no figure)",
          direction=None,
          measure="objective ablation: A/B with p2 against constant weighting at equal steps: compositional accuracy "
                  "and KID_tiny"),
    Claim("Training is several times cheaper",
          paper="Table 2, §4.3: Stage C 24,602 A100 hours against SD 2.1's 200,000 (8x); 1.42B against 3.9B "
                "training samples",
          # "several" at its weakest: twice Stage C's FLOPs (the paper's figure is 8x)
          direction="higher", reference=1.0, margin=1.0,
          measure="training FLOPs at which the baseline first matches Würstchen's attribute share (probe: of each "
                  "prompt's count, position, background, shapes, colours and sizes, the share read right; "
                  "all-correct sits near its floor on tiny and traces no curve), over Stage C's training FLOPs: "
                  "the baseline's EMA weights at 08's snapshots and at the end, pooled over seeds, linear in FLOPs "
                  "between them; matched at the first snapshot counts as that snapshot (an upper bound), never "
                  "matched as +inf (an interval open above: inconclusive). Snapshots keep a higher lr than a run "
                  "trained to that budget, which favours the claim. Pigeonhole bootstrap over seeds and prompts"),
    Claim("Inference is faster than the baseline",
          paper="Abstract, Figure 4: inference over twice as fast (A100, 1024 x 1024, against SD 2.1 and SD XL)",
          direction="higher", reference=1.0, margin=0.0,
          measure="seconds per image of the baseline LDM over Würstchen's, each with its own sampling settings "
                  "(Würstchen: prior and decoder steps of 07; the baseline: 08's DDPM steps), on the same held-out "
                  "prompts in the same batches of the same run (CPU, one thread), paired by batch"),
)
INFERENCE = LATER[-1]
CHEAPER = LATER[-2]


def speed_ratio(model_seconds: Sequence[float], baseline_seconds: Sequence[float], n_boot: int = MIN_BOOT,
                seed: int = 0) -> Estimate:
    """Baseline seconds over Würstchen seconds for the same batches (> 1: Würstchen faster), bootstrapped over the
    batches (the same batches for both: paired)."""
    m = torch.as_tensor(model_seconds, dtype=torch.float64)
    b = torch.as_tensor(baseline_seconds, dtype=torch.float64)
    if m.shape != b.shape or m.numel() == 0 or not bool((m > 0).all()):
        raise ValueError(f"need positive per-batch seconds for the same batches, got {m.shape} and {b.shape}")
    return bootstrap(lambda i: float(b[i].sum() / m[i].sum()), m.numel(), n_boot=max(n_boot, MIN_BOOT), seed=seed)


def first_match(target: float, curve: Sequence[float], fractions: Sequence[float]) -> float:
    """Where ``curve`` (values at increasing ``fractions`` of a budget) first reaches ``target``: linear between
    the two points around it, the first fraction when the first value already does, +inf when none does."""
    for k, (f, v) in enumerate(zip(fractions, curve)):
        if v >= target:
            if k == 0:
                return float(f)
            f0, v0 = fractions[k - 1], curve[k - 1]
            return float(f0 + (target - v0) / (v - v0) * (f - f0))  # v0 < target <= v
    return math.inf


def matching_budget(model: Tensor, curve: Tensor, fractions: Sequence[float], n_boot: int = MIN_BOOT,
                    level: float = 0.95, seed: int = 0) -> Estimate:
    """The budget (in ``fractions``' unit) at which the baseline first matches Würstchen (:func:`first_match` of
    the seed-and-prompt means): ``model`` (S, P) per-prompt scores of Würstchen's seeds, ``curve`` (K, S, P) the
    baseline's at increasing ``fractions``, seed s paired with Würstchen's seed s, the same P prompts.

    The interval: the pigeonhole bootstrap of :func:`pooled_over_seeds` over seeds and prompts, at least
    :data:`MIN_BOOT` resamples, keeping unmatched resamples (+inf), which open it above."""
    m, c = torch.as_tensor(model, dtype=torch.float64), torch.as_tensor(curve, dtype=torch.float64)
    fr = [float(f) for f in fractions]
    if m.dim() != 2 or c.dim() != 3 or c.shape[1:] != m.shape or c.shape[0] != len(fr) or m.numel() == 0:
        raise ValueError(f"need model (S, P) and curve (K, S, P) with K = {len(fr)} fractions, got "
                         f"{tuple(m.shape)} and {tuple(c.shape)}")
    if any(b <= a for a, b in zip(fr, fr[1:])) or fr[0] <= 0:
        raise ValueError(f"fractions must be positive and increasing, got {fr}")
    if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(c).all())):
        raise ValueError("model and curve scores must be finite")

    def stat(s_idx: Tensor, p_idx: Tensor) -> float:
        target = float(m[s_idx][:, p_idx].mean())
        return first_match(target, c[:, s_idx][:, :, p_idx].mean(dim=(1, 2)).tolist(), fr)

    est = bootstrap(stat, *m.shape, n_boot=max(n_boot, MIN_BOOT), level=level, seed=seed, keep_infinite=True)
    return dataclasses.replace(est, n=m.numel())


def claim_from_run(claim: Claim, notebook: str, run: Any) -> Claim:
    """``claim`` with the measurement that the finished ``run`` of ``notebook`` recorded for it (its metrics'
    ``claims`` list, by name), the rule staying the one stated here; "not measured yet" saying why without one."""
    if run is None:
        return dataclasses.replace(claim, measured=None, measure=f"{claim.measure}; not measured: no {notebook} run")
    records = {r.get("claim"): r for r in run.metrics().get("claims", [])}
    record = records.get(claim.name)
    if record is None or record.get("measured") is None:
        return dataclasses.replace(claim, measured=None,
                                   measure=f"{claim.measure}; not measured: {notebook}/{run.run_id} recorded none")
    met = record.get("precondition_met") if claim.precondition else None
    if claim.precondition and met is None:
        return dataclasses.replace(claim, measured=None, measure=f"{claim.measure}; not measured: {notebook}/"
                                                                 f"{run.run_id} predates the rule's precondition")
    low, high = record["measured"]["ci"]
    est = Estimate(float(record["measured"]["value"]), float(low), float(high), level=claim.level)
    return dataclasses.replace(claim, measured=est, precondition_met=met if met is None else bool(met),
                               measure=f"{record.get('measurement') or claim.measure}; {notebook}/{run.run_id}")


def stated_claims() -> list[Claim]:
    """Every claim with its rule as stated before any measurement (what the notebook prints first)."""
    return [*MEASURED, EQUAL_COMPUTE_BC, *LATER]


PAIRED = ("all_correct", "cell_iou")               # per-prompt checks compared as paired differences
RATES = ("oracle_win", "judge_win", "judges_agree")  # per-prompt outcomes averaged as rates
# estimate -> column of the comparison table
COLUMNS = {"all_correct_diff": "Δ all_correct (points)", "cell_iou_diff": "Δ cell_iou (points)",
           "oracle_win": "oracle: Würstchen preferred (%)", "judge_win": "judge CLIP: Würstchen preferred (%)",
           "judges_agree": "judges agree (%)", "kid_diff": "KID_tiny: baseline minus Würstchen"}


@dataclass
class BaselineComparison:
    """Würstchen against each baseline seed on the same prompts: paired estimates per seed and pooled over seeds."""

    per_seed: dict[str, dict[str, Estimate]]   # baseline generator name -> quantity -> estimate
    pooled: dict[str, Estimate] | None         # None with a single seed (no seed spread to pool)

    def headline(self, key: str = "all_correct_diff") -> Estimate:
        """A claim's measurement: the pooled estimate of ``key`` (one seed: its own)."""
        return (self.pooled if self.pooled is not None else next(iter(self.per_seed.values())))[key]

    def table(self) -> pd.DataFrame:
        rows = dict(self.per_seed)
        if self.pooled is not None:
            rows[f"pooled over {len(self.per_seed)} seeds"] = self.pooled
        df = pd.DataFrame({name: {COLUMNS[k]: str(v) for k, v in est.items()} for name, est in rows.items()}).T
        df.index.name = "Würstchen against"
        return df

    def numbers(self) -> dict[str, Any]:
        rows = {**self.per_seed, **({"pooled": self.pooled} if self.pooled is not None else {})}
        return {name: {**{k: v.value for k, v in est.items()}, **{f"{k}_ci": [v.low, v.high] for k, v in est.items()}}
                for name, est in rows.items()}


def _per_prompt(model_checks: Mapping[str, Tensor], checks: Mapping[str, Tensor], model_scores: Tensor,
                scores: Tensor) -> dict[str, Any]:
    """Per prompt, Würstchen against one baseline seed: both arms of each paired check (points), and the two judges'
    outcomes for Würstchen and their agreement (%, ties half)."""
    oracle = oracle_outcomes(model_checks, checks)
    judge = pairwise_outcomes(model_scores, scores)
    return {**{k: (100 * model_checks[k], 100 * checks[k]) for k in PAIRED}, "oracle_win": 100 * oracle,
            "judge_win": 100 * judge, "judges_agree": 100 * pairwise_agreement(oracle, judge)}


def compare_with_baseline(checks: Mapping[str, Mapping[str, Tensor]], scores: Mapping[str, Tensor],
                          model: str | Sequence[str], baselines: Sequence[str], n_boot: int = MIN_BOOT, seed: int = 0,
                          kid: tuple[list[Estimate], Estimate | None] | None = None) -> BaselineComparison:
    """``checks``: generator -> per-prompt probe checks (``CompositionalResult.checks``); ``scores``: generator ->
    per-prompt judge score (``pick_scores``); ``model`` (one generator, or one per baseline seed: Würstchen's
    training seeds, paired in order) against each of ``baselines`` (one per training seed); ``kid``: the paired KID
    differences per pair and pooled (``image_metrics.paired_kid_difference``)."""
    if not baselines:
        raise ValueError("need at least one baseline seed to compare with")
    models = [model] * len(baselines) if isinstance(model, str) else list(model)
    if len(models) != len(baselines):
        raise ValueError(f"need one model per baseline seed (or one model), got {len(models)} and {len(baselines)}")
    n_boot = max(n_boot, MIN_BOOT)
    # one row per pair: the baseline's name alone when a single Würstchen faces every baseline seed
    labels = [b if isinstance(model, str) else f"{m} / {b}" for m, b in zip(models, baselines)]
    arms = {label: _per_prompt(checks[m], checks[b], scores[m], scores[b])
            for label, m, b in zip(labels, models, baselines)}
    per_seed = {label: {**{f"{k}_diff": paired_difference(*q[k], n_boot=n_boot, seed=seed) for k in PAIRED},
                        **{k: mean_ci(q[k], n_boot=n_boot, seed=seed) for k in RATES}} for label, q in arms.items()}
    if kid is not None:
        for label, est in zip(labels, kid[0]):
            per_seed[label]["kid_diff"] = est
    if len(labels) == 1:
        return BaselineComparison(per_seed, None)
    stacked = {k: [torch.stack(arm) for arm in zip(*(arms[label][k] for label in labels))] for k in PAIRED}  # (S, P)
    pooled = {**{f"{k}_diff": pooled_paired_difference(*stacked[k], n_boot=n_boot, seed=seed) for k in PAIRED},
              **{k: pooled_over_seeds(torch.stack([arms[label][k] for label in labels]), n_boot=n_boot, seed=seed)
                 for k in RATES}}
    if kid is not None and kid[1] is not None:
        pooled["kid_diff"] = kid[1]
    return BaselineComparison(per_seed, pooled)


def measured_claims(comparison: BaselineComparison | None, detail: str, speed: Estimate | None = None,
                    speed_detail: str = "", others: Sequence[Claim] = (), cheaper: Estimate | None = None,
                    cheaper_detail: str = "", comparison_bc: BaselineComparison | None = None,
                    detail_bc: str = "") -> list[Claim]:
    """The claims with 07's measurements filled in from ``comparison`` (``detail``: the 08 run, its budget and
    seeds), or "not measured yet" with ``detail`` saying why; the inference claim from ``speed`` (a
    :func:`speed_ratio`), the training-cost claim from ``cheaper`` (a :func:`matching_budget`; without it
    ``cheaper_detail`` says why), the second equal-compute row from ``comparison_bc`` (the baseline at Stage B +
    C's budget; ``detail_bc`` names it or says why there is none); ``others``: claims measured by other
    notebooks (:func:`claim_from_run`), replacing the later claims of the same name; the rest as stated."""
    out = []
    for claim in MEASURED:
        key = HEADLINES[claim.name]
        if comparison is None or key not in (comparison.pooled or next(iter(comparison.per_seed.values()))):
            out.append(dataclasses.replace(claim, measure=f"{claim.measure}; not measured: {detail}"))
            continue
        single = "" if comparison.pooled is not None else " (one seed: no seed spread in the interval)"
        out.append(dataclasses.replace(claim, measured=comparison.headline(key),
                                       measure=f"{claim.measure}; {detail}{single}"))
    later = {c.name: c for c in LATER}
    later[INFERENCE.name] = (dataclasses.replace(INFERENCE, measured=speed, measure=f"{INFERENCE.measure}; "
                                                 f"{speed_detail}") if speed is not None else INFERENCE)
    why = cheaper_detail if cheaper is not None else f"not measured: {cheaper_detail or detail}"
    later[CHEAPER.name] = dataclasses.replace(CHEAPER, measured=cheaper, measure=f"{CHEAPER.measure}; {why}")
    later.update({c.name: c for c in others})
    bc = (dataclasses.replace(EQUAL_COMPUTE_BC, measured=comparison_bc.headline(),
                              measure=f"{EQUAL_COMPUTE_BC.measure}; {detail_bc}") if comparison_bc is not None else
          dataclasses.replace(EQUAL_COMPUTE_BC, measure=f"{EQUAL_COMPUTE_BC.measure}; not measured: "
                                                        f"{detail_bc or detail}"))
    return [*out, bc, *later.values()]


def claims_records(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """The claims for ``metrics.json``: claim, verdict, measured (value and interval, or None), rule, measurement
    and the paper's figure."""
    return [{"claim": c.name, "verdict": verdict(c),
             "measured": None if c.measured is None else {"value": c.measured.value, "ci": [c.measured.low,
                                                                                            c.measured.high]},
             "rule": c.rule, "measurement": c.measure, "paper": c.paper,
             **({"precondition": c.precondition, "precondition_met": c.precondition_met} if c.precondition else {})}
            for c in claims]
