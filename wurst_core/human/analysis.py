"""The study's analysis: the paper's Figure 5, Bradley–Terry strengths, the quality of the data and the agreement of
people with the automated judges.

Judgments and units. Every judgment belongs to a rater, and judgments of one rater are not independent, so every
interval comes from a bootstrap that resamples raters (``bradley_terry.rater_weights``; percentile intervals). The
comparisons between systems are the ``pair`` and ``repeat`` items; attention checks only measure attention.

* Figure 5 (a), overall preference: for the reference system against each other system, the share of judgments
  preferring each, and neither, per prompt set (every judgment counted, whoever gave it).
* Figure 5 (b), the preferred system per rater: each rater's own choice between the reference and each other system
  (the one they chose more often, or equal), counted over raters at or above the 50th percentile of comparisons per
  rater in the prompt set, and over all raters. (c, d): the histograms of comparisons per rater, with that cutoff.
* Bradley–Terry with ties across all systems (``bradley_terry``), and per prompt the majority preference per pair.
* Quality: the attention-check failure rate and the raters it excludes (those failing more than
  ``max_attention_fail`` of their checks; every other number uses the remaining raters), consistency on repeated
  pairs (chance: one in three), position bias (the share of decisive choices for the left image; 50 % without bias)
  and agreement between raters (Krippendorff's alpha, ``krippendorff`` package, ordinal and nominal, over the pair
  items judged by at least two raters).
* Judges: how often a person's judgment agrees with the judge CLIP's PickScore-procedure preference and with the
  exact compositional judge on the same two images (ties count half, ``evaluation.oracle.pairwise_agreement``),
  beside how often two people agree on the same item (the ceiling any judge can reach).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import krippendorff
import numpy as np
import pandas as pd
import torch

from ..evaluation.oracle import oracle_outcomes, pairwise_agreement
from ..evaluation.preference import pairwise_outcomes
from ..evaluation.stats import Estimate
from .bradley_terry import BTResult, bradley_terry, percentile, rater_weights
from .store import Store, judgments

REGULAR = ("pair", "repeat")
OUTCOME = {"a": 1.0, "neither": 0.5, "b": 0.0}


@dataclass(frozen=True)
class AnalysisSpec:
    reference: str = ""               # the system of Figure 5 (a, b) ("": the study's first system)
    n_boot: int = 1000                # rater-bootstrap resamples
    max_attention_fail: float = 0.34  # raters failing more than this share of their attention checks are excluded
    level: float = 0.95
    seed: int = 0


@dataclass
class StudyData:
    judgments: pd.DataFrame
    systems: list[str]
    prompt_sets: list[str]
    meta: dict[str, Any]
    images: pd.DataFrame

    @property
    def label(self) -> str:
        """"simulated", "human", or "mixed (N of M judgments simulated)"; every report carries it."""
        n, sim = len(self.judgments), int(self.judgments["simulated"].sum()) if len(self.judgments) else 0
        if n and sim == n:
            return "simulated"
        if sim:
            return f"mixed ({sim} of {n} judgments simulated)"
        return "simulated" if self.meta.get("simulated") and not n else "human"


def load(store: Store) -> StudyData:
    """Every judgment with its design, and for each the outcome in the item's terms: ``outcome_a`` is 1 when the
    item's ``system_a`` was chosen, 0 for ``system_b``, 0.5 for neither."""
    meta = store.meta()
    df = judgments(store)
    systems = [s for s in meta.get("systems", [])]
    sets = store.table("prompts")["prompt_set"].drop_duplicates().tolist()
    a_left = df["left_system"] == df["system_a"]
    df["a_left"] = a_left
    df["chose"] = np.where(df["choice"] == "neither", "neither",
                           np.where((df["choice"] == "left") == a_left, "a", "b"))
    df["outcome_a"] = df["chose"].map(OUTCOME)
    df["simulated"] = df["simulated"].astype(bool)
    return StudyData(df, systems, sets, meta, store.table("images"))


def ratio(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int, level: float = 0.95,
          scale: float = 100.0) -> Estimate:
    """``sum(num) / sum(den)`` over raters (one entry each) with a rater-bootstrap interval, times ``scale``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if den.sum() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), level, 0)
    w = rater_weights(len(num), n_boot, np.random.default_rng([seed, 5]))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (w @ num) / (w @ den)
    draws = draws[np.isfinite(draws)]
    lo, hi = percentile(draws, level, axis=0)
    return Estimate(scale * num.sum() / den.sum(), scale * float(lo), scale * float(hi), level, int(den.sum()))


def _per_rater(df: pd.DataFrame, column: pd.Series, raters: pd.Index) -> np.ndarray:
    return column.groupby(df["rater_id"]).sum().reindex(raters, fill_value=0).to_numpy(dtype=np.float64)


# ------------------------------------------------------------------------------------------------- quality

def attention(df: pd.DataFrame, spec: AnalysisSpec) -> tuple[pd.DataFrame, set[str]]:
    """Per rater: attention checks seen and failed ("neither" fails too), and who is excluded."""
    checks = df[df["kind"] == "attention"]
    per = pd.DataFrame({"rater_id": df["rater_id"].drop_duplicates()}).set_index("rater_id")
    per["checks"] = checks.groupby("rater_id").size().reindex(per.index, fill_value=0)
    per["failed"] = (checks["chose"] != "a").groupby(checks["rater_id"]).sum().reindex(per.index, fill_value=0)
    per["fail_rate"] = per["failed"] / per["checks"].where(per["checks"] > 0)
    per["excluded"] = (per["failed"] > 0) & (per["fail_rate"] > spec.max_attention_fail)
    return per.reset_index(), set(per.index[per["excluded"]])


def consistency(df: pd.DataFrame) -> pd.DataFrame:
    """Each (rater, repeated pair) judged twice: the two outcomes in the item's terms, and whether they agree."""
    repeats = df[df["kind"] == "repeat"][["rater_id", "repeat_of", "outcome_a"]]
    first = df[df["kind"] == "pair"][["rater_id", "item_id", "outcome_a"]]
    both = repeats.merge(first, left_on=["rater_id", "repeat_of"], right_on=["rater_id", "item_id"],
                         suffixes=("_repeat", "_first"))
    both["consistent"] = both["outcome_a_repeat"] == both["outcome_a_first"]
    return both


def krippendorff_alpha(df: pd.DataFrame) -> dict[str, Any]:
    """Krippendorff's alpha over the pair items judged by at least two raters (values b < neither < a)."""
    pairs = df[df["kind"] == "pair"]
    counts = pd.crosstab(pairs["item_id"], pairs["chose"]).reindex(columns=["b", "neither", "a"], fill_value=0)
    counts = counts[counts.sum(1) >= 2]
    out: dict[str, Any] = {"units": int(len(counts)), "judgments": int(counts.to_numpy().sum())}
    if len(counts) < 2 or (counts.sum(0) > 0).sum() < 2:
        return {**out, "ordinal": float("nan"), "nominal": float("nan"),
                "note": "too few items judged by two raters (or a single value throughout)"}
    values = counts.to_numpy()
    for level in ("ordinal", "nominal"):
        out[level] = float(krippendorff.alpha(value_counts=values, level_of_measurement=level))
    return out


# ---------------------------------------------------------------------------------------------- Figure 5

def _comparison(df: pd.DataFrame, reference: str, other: str) -> pd.DataFrame:
    """Judgments of ``reference`` against ``other``, with ``ref_outcome`` (1 reference chosen, 0.5, 0)."""
    rows = df[((df["system_a"] == reference) & (df["system_b"] == other)) |
              ((df["system_a"] == other) & (df["system_b"] == reference))].copy()
    rows["ref_outcome"] = np.where(rows["system_a"] == reference, rows["outcome_a"], 1 - rows["outcome_a"])
    return rows


def _subsets(df: pd.DataFrame, sets: list[str]) -> list[tuple[str, pd.DataFrame]]:
    out = [(s, df[df["prompt_set"] == s]) for s in sets]
    return out + ([("all prompt sets", df)] if len(sets) > 1 else [])


def overall_preference(df: pd.DataFrame, reference: str, systems: list[str], sets: list[str],
                       spec: AnalysisSpec) -> pd.DataFrame:
    rows = []
    for name, part in _subsets(df, sets):
        for other in [s for s in systems if s != reference]:
            comp = _comparison(part, reference, other)
            raters = pd.Index(comp["rater_id"].unique())
            den = _per_rater(comp, pd.Series(1.0, index=comp.index), raters)
            row = {"prompt_set": name, "reference": reference, "other": other, "judgments": len(comp),
                   "raters": len(raters)}
            for label, value in (("prefer_reference", 1.0), ("neither", 0.5), ("prefer_other", 0.0)):
                est = ratio(_per_rater(comp, (comp["ref_outcome"] == value).astype(float), raters), den,
                            spec.n_boot, spec.seed, spec.level)
                row.update({label: est.value, f"{label}_low": est.low, f"{label}_high": est.high})
            rows.append(row)
    return pd.DataFrame(rows)


def comparisons_per_rater(df: pd.DataFrame, sets: list[str]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Comparisons each rater made in each prompt set, and each set's 50th-percentile cutoff."""
    counts = df.groupby(["prompt_set", "rater_id"]).size().rename("comparisons").reset_index()
    cutoffs = {s: float(np.percentile(counts[counts["prompt_set"] == s]["comparisons"], 50))
               for s in sets if (counts["prompt_set"] == s).any()}
    return counts, cutoffs


def per_rater_preference(df: pd.DataFrame, reference: str, systems: list[str], sets: list[str],
                         cutoffs: dict[str, float], counts: pd.DataFrame, spec: AnalysisSpec) -> pd.DataFrame:
    rows = []
    for name in sets:
        part = df[df["prompt_set"] == name]
        made = counts[counts["prompt_set"] == name].set_index("rater_id")["comparisons"]
        for other in [s for s in systems if s != reference]:
            comp = _comparison(part, reference, other)
            mean = comp.groupby("rater_id")["ref_outcome"].mean()
            prefers = pd.Series(np.where(mean > 0.5, "reference", np.where(mean < 0.5, "other", "equal")),
                                index=mean.index)
            cutoff = cutoffs.get(name, np.nan)
            for group, keep in ((f">= 50th percentile ({cutoff:g} comparisons)", made.reindex(mean.index) >= cutoff),
                                ("all raters", pd.Series(True, index=mean.index))):
                chosen = prefers[keep.to_numpy()]
                row = {"prompt_set": name, "reference": reference, "other": other, "raters": group,
                       "n_raters": len(chosen)}
                for label in ("reference", "equal", "other"):
                    est = ratio((chosen == label).to_numpy(float), np.ones(len(chosen)), spec.n_boot, spec.seed,
                                spec.level)
                    row.update({f"prefer_{label}": est.value, f"prefer_{label}_low": est.low,
                                f"prefer_{label}_high": est.high})
                rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ Bradley–Terry, prompts

def rater_matrices(df: pd.DataFrame, systems: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per rater: decisive wins ``[r, i, j]`` (i chosen over j) and ties (symmetric), over the compared systems."""
    raters = list(df["rater_id"].drop_duplicates())
    index = {s: k for k, s in enumerate(systems)}
    r = df["rater_id"].map({x: k for k, x in enumerate(raters)}).to_numpy()
    a, b = df["system_a"].map(index).to_numpy(), df["system_b"].map(index).to_numpy()
    s = len(systems)
    wins, ties = np.zeros((len(raters), s, s)), np.zeros((len(raters), s, s))
    chose = df["chose"].to_numpy()
    for mask, win, lose in ((chose == "a", a, b), (chose == "b", b, a)):
        np.add.at(wins, (r[mask], win[mask], lose[mask]), 1.0)
    tie = chose == "neither"
    np.add.at(ties, (r[tie], a[tie], b[tie]), 1.0)
    np.add.at(ties, (r[tie], b[tie], a[tie]), 1.0)
    return wins, ties, raters


def majority_per_prompt(df: pd.DataFrame) -> pd.DataFrame:
    """Per prompt and system pair: judgments for each side and neither, and the majority's choice."""
    d = df.assign(first=df[["system_a", "system_b"]].min(axis=1), second=df[["system_a", "system_b"]].max(axis=1))
    d["for_first"] = np.where(d["system_a"] == d["first"], d["chose"] == "a", d["chose"] == "b")
    d["for_second"] = np.where(d["system_a"] == d["first"], d["chose"] == "b", d["chose"] == "a")
    d["neither"] = d["chose"] == "neither"
    g = d.groupby(["prompt_set", "prompt_id", "prompt", "first", "second"])[["for_first", "neither", "for_second"]]
    out = g.sum().astype(int).reset_index().rename(columns={"first": "system_1", "second": "system_2",
                                                            "for_first": "chose_1", "for_second": "chose_2"})
    out["majority"] = np.where(out["chose_1"] > out["chose_2"], out["system_1"],
                               np.where(out["chose_2"] > out["chose_1"], out["system_2"], "tie"))
    return out


def majority_summary(majority: pd.DataFrame) -> pd.DataFrame:
    """Per system pair: on how many prompts the majority preferred each system, or neither."""
    rows = []
    for (s1, s2), g in majority.groupby(["system_1", "system_2"]):
        rows.append({"system_1": s1, "system_2": s2, "prompts": len(g), "majority_1": int((g["majority"] == s1).sum()),
                     "tied": int((g["majority"] == "tie").sum()), "majority_2": int((g["majority"] == s2).sum())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- judges

def _judge_outcomes(df: pd.DataFrame, images: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The judgments whose two images both have a ``column`` score, and the judge's outcome for ``system_a``."""
    scores = images.set_index(["system", "prompt_id"])[column]
    sa = pd.Series(scores.reindex(list(zip(df["system_a"], df["prompt_id"]))).to_numpy(), index=df.index)
    sb = pd.Series(scores.reindex(list(zip(df["system_b"], df["prompt_id"]))).to_numpy(), index=df.index)
    known = sa.notna() & sb.notna()
    if not known.any():
        return df.iloc[:0], np.zeros(0)
    a, b = torch.tensor(sa[known].to_numpy()), torch.tensor(sb[known].to_numpy())
    if column == "judge_score":
        outcome = pairwise_outcomes(a, b)
    else:
        outcome = oracle_outcomes({"checks": a}, {"checks": b})
    return df[known], outcome.numpy()


def _pairwise_human(df: pd.DataFrame) -> tuple[float, int]:
    """How often two raters agree on the same pair item (ties half), over all pairs of raters on an item."""
    agree = n = 0.0
    for _, g in df[df["kind"] == "pair"].groupby("item_id"):
        x = g["outcome_a"].to_numpy()
        if len(x) >= 2:
            d = 1 - np.abs(x[:, None] - x[None, :])
            agree += (d.sum() - len(x)) / 2
            n += len(x) * (len(x) - 1) / 2
    return (100 * agree / n if n else float("nan")), int(n)


def judge_agreement(df: pd.DataFrame, images: pd.DataFrame, meta: dict[str, Any], spec: AnalysisSpec) -> pd.DataFrame:
    judges = meta.get("judges", {})
    rows = []
    for column, name in (("judge_score", "PickScore procedure (judge CLIP)"),
                         ("attribute_score", "exact compositional judge")):
        part, outcome = _judge_outcomes(df, images, column)
        row: dict[str, Any] = {"judge": name, "how": judges.get(column, ""), "judgments": len(part),
                               "items": int(part["item_id"].nunique()) if len(part) else 0}
        if len(part):
            agree = pairwise_agreement(torch.tensor(part["outcome_a"].to_numpy()), torch.tensor(outcome)).numpy()
            raters = pd.Index(part["rater_id"].unique())
            est = ratio(_per_rater(part, pd.Series(agree, index=part.index), raters),
                        _per_rater(part, pd.Series(1.0, index=part.index), raters), spec.n_boot, spec.seed, spec.level)
            majority = part.assign(judge=outcome).groupby("item_id").agg(h=("outcome_a", "mean"), j=("judge", "first"))
            majority_h = np.sign(majority["h"] - 0.5) / 2 + 0.5
            row.update({"agreement": est.value, "agreement_low": est.low, "agreement_high": est.high,
                        "majority_agreement": float(100 * (1 - np.abs(majority_h - majority["j"])).mean()),
                        "judge_ties": float(100 * (outcome == 0.5).mean())})
        else:
            row["note"] = "no pair has this judge's score for both images"
        rows.append(row)
    human, n = _pairwise_human(df)
    rows.append({"judge": "another rater (same item)", "how": "pairs of raters who judged the same item",
                 "judgments": n, "agreement": human})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ all

@dataclass
class Analysis:
    label: str
    reference: str
    systems: list[str]
    prompt_sets: list[str]
    overall: pd.DataFrame
    per_rater: pd.DataFrame
    counts: pd.DataFrame
    cutoffs: dict[str, float]
    bt: BTResult
    majority: pd.DataFrame
    attention: pd.DataFrame
    quality: pd.DataFrame
    judges: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables for a report, each with a leading ``data`` column saying whether the judgments are simulated."""
        out = {"fig5a_overall_preference": self.overall, "fig5b_preferred_per_rater": self.per_rater,
               "bradley_terry": self.bt.table(self.reference), "majority_per_prompt_summary": majority_summary(
                   self.majority), "data_quality": self.quality, "judge_agreement": self.judges}
        return {k: v.assign(data=self.label)[["data", *v.columns]] for k, v in out.items()}

    def metrics(self) -> dict[str, Any]:
        bt = {s: {"strength": float(self.bt.theta[k]), "ci": [float(self.bt.low[k]), float(self.bt.high[k])]}
              for k, s in enumerate(self.systems)}
        quality = {r["metric"]: r["value"] for r in self.quality.to_dict("records")}
        return {"data": self.label, "info": self.info, "bradley_terry": bt, "davidson_nu": self.bt.nu,
                "quality": quality, "cutoffs": self.cutoffs}


def _quality_rows(df: pd.DataFrame, all_df: pd.DataFrame, per: pd.DataFrame, excluded: set[str],
                  spec: AnalysisSpec) -> pd.DataFrame:
    checks = all_df[all_df["kind"] == "attention"]
    raters = pd.Index(all_df["rater_id"].unique())
    fail = ratio(_per_rater(checks, (checks["chose"] != "a").astype(float), raters),
                 _per_rater(checks, pd.Series(1.0, index=checks.index), raters), spec.n_boot, spec.seed, spec.level)
    rep = consistency(df)
    rep_raters = pd.Index(rep["rater_id"].unique())
    cons = ratio(_per_rater(rep, rep["consistent"].astype(float), rep_raters),
                 _per_rater(rep, pd.Series(1.0, index=rep.index), rep_raters), spec.n_boot, spec.seed, spec.level)
    regular = df[df["kind"].isin(REGULAR)]
    decisive = regular[regular["choice"] != "neither"]
    kept = pd.Index(regular["rater_id"].unique())
    left = ratio(_per_rater(decisive, (decisive["choice"] == "left").astype(float), kept),
                 _per_rater(decisive, pd.Series(1.0, index=decisive.index), kept), spec.n_boot, spec.seed, spec.level)
    neither = ratio(_per_rater(regular, (regular["choice"] == "neither").astype(float), kept),
                    _per_rater(regular, pd.Series(1.0, index=regular.index), kept), spec.n_boot, spec.seed, spec.level)
    alpha = krippendorff_alpha(regular)
    n_excl = all_df["rater_id"].isin(excluded).sum()
    rows = [
        ("attention-check failure rate (%)", fail, f"{fail.n} checks; 'neither' counts as a failure"),
        ("raters excluded", len(excluded), f"failed more than {spec.max_attention_fail:.0%} of their checks, of "
                                           f"{len(per)} raters"),
        ("judgments excluded (%)", 100 * n_excl / max(len(all_df), 1), f"{n_excl} of {len(all_df)} judgments"),
        ("repeated pairs judged the same (%)", cons, f"{cons.n} repeated pairs; chance 33.3 %"),
        ("left image chosen, decisive judgments (%)", left, f"{left.n} decisive judgments; no bias: 50 %"),
        ("neither chosen (%)", neither, f"{neither.n} judgments"),
        ("Krippendorff's alpha, ordinal", alpha["ordinal"], f"{alpha['units']} items judged by two or more raters"),
        ("Krippendorff's alpha, nominal", alpha["nominal"], alpha.get("note", "values: b, neither, a")),
    ]
    out = []
    for metric, v, note in rows:
        if isinstance(v, Estimate):
            out.append({"metric": metric, "value": v.value, "low": v.low, "high": v.high, "note": note})
        else:
            out.append({"metric": metric, "value": float(v), "low": np.nan, "high": np.nan, "note": note})
    return pd.DataFrame(out)


def analyse(data: StudyData, spec: AnalysisSpec = AnalysisSpec()) -> Analysis:
    """Every number of the study (see the module docstring), from the raters who pass the attention checks."""
    if data.judgments.empty:
        raise ValueError("the study has no judgments yet: nothing to analyse")
    reference = spec.reference or data.systems[0]
    if reference not in data.systems:
        raise ValueError(f"reference {reference!r} is not one of the study's systems {data.systems}")
    per, excluded = attention(data.judgments, spec)
    df = data.judgments[~data.judgments["rater_id"].isin(excluded)]
    if df.empty:
        raise ValueError("every rater failed the attention checks: nothing left to analyse")
    regular = df[df["kind"].isin(REGULAR)]
    counts, cutoffs = comparisons_per_rater(regular, data.prompt_sets)
    wins, ties, _ = rater_matrices(regular, data.systems)
    bt = bradley_terry(wins, ties, data.systems, spec.n_boot, spec.seed, spec.level)
    sim = data.meta.get("simulation") or {}
    if sim:
        bt.truth = {"true_population": sim.get("population_strengths", {}),
                    "true_rater_level": sim.get("model", {}).get("strengths", {})}
    info = {"data": data.label, "judgments": int(len(data.judgments)),
            "raters": int(data.judgments["rater_id"].nunique()),
            "raters_kept": int(df["rater_id"].nunique()), "comparisons_kept": int(len(regular)),
            "systems": data.systems, "reference": reference, "prompt_sets": data.prompt_sets,
            "n_boot": spec.n_boot, "notes": data.meta.get("notes", [])}
    return Analysis(data.label, reference, data.systems, data.prompt_sets,
                    overall_preference(regular, reference, data.systems, data.prompt_sets, spec),
                    per_rater_preference(regular, reference, data.systems, data.prompt_sets, cutoffs, counts, spec),
                    counts, cutoffs, bt, majority_per_prompt(regular), per,
                    _quality_rows(df, data.judgments, per, excluded, spec),
                    judge_agreement(regular, data.images, data.meta, spec), info)


def truth_gap(analysis: Analysis, a: str, b: str) -> float | None:
    """The simulation's population gap ``theta_a - theta_b`` that the fit should recover (None for human data)."""
    truth = analysis.bt.truth.get("true_population") or {}
    return truth[a] - truth[b] if a in truth and b in truth else None


def dumps(analysis: Analysis) -> str:
    return json.dumps(analysis.metrics(), indent=2, sort_keys=True, default=float)
