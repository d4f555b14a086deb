"""The study's figures in the paper's layout (Figure 5: a, b above; c, d below), and the written report.

Every figure's title says whether the judgments are simulated (``Analysis.label``), so that no plot of a simulated
study can pass for one of people.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .analysis import Analysis, dumps

COLOURS = {"reference": "#2f6db5", "neither": "#b9b9b9", "other": "#d9822b", "equal": "#b9b9b9"}


def _title(analysis: Analysis, text: str) -> str:
    label = analysis.label
    return f"{text} — {label.upper() if label == 'simulated' else label} data"


def _stacked(ax, labels: list[str], parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]],
             xlabel: str) -> None:
    """Horizontal stacked bars (shares in %), with the first part's interval drawn on its end; legend below."""
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for k, (name, value, low, high, colour) in enumerate(parts):
        ax.barh(y, value, left=left, color=colour, label=name, edgecolor="white")
        if k == 0:
            ax.errorbar(value, y, xerr=[value - low, high - value], fmt="none", ecolor="black", capsize=3, lw=1)
        for yy, v, l0 in zip(y, value, left):
            if v >= 8:
                ax.text(l0 + v / 2, yy, f"{v:.0f}%", ha="center", va="center", fontsize=7)
        left = left + value
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(parts), frameon=False)


def figure5(analysis: Analysis):
    """(a) overall preference, (b) preferred system per rater (>= 50th percentile and all), (c, d) comparisons per
    rater with the cutoff, one histogram per prompt set (the first two; a single set fills both with it and all)."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ref = analysis.reference
    o = analysis.overall
    ax = axes[0][0]
    ax.set_title(f"(a) overall preference: {ref} against each system (% of judgments)", fontsize=9)
    labels = [f"{r.other} [{r.prompt_set}]" for r in o.itertuples()]
    _stacked(ax, labels, [
        (f"prefer {ref}", o["prefer_reference"].to_numpy(), o["prefer_reference_low"].to_numpy(),
         o["prefer_reference_high"].to_numpy(), COLOURS["reference"]),
        ("neither", o["neither"].to_numpy(), o["neither"].to_numpy(), o["neither"].to_numpy(), COLOURS["neither"]),
        ("prefer the other", o["prefer_other"].to_numpy(), o["prefer_other"].to_numpy(), o["prefer_other"].to_numpy(),
         COLOURS["other"])], "% of judgments (bar: 95% rater-bootstrap interval)")

    p = analysis.per_rater
    ax = axes[0][1]
    ax.set_title(f"(b) each rater's preferred system: {ref} or the other (% of raters)", fontsize=9)
    labels = [f"{r.other} [{r.prompt_set}], {'all' if r.raters == 'all raters' else '>= p50'} (n={r.n_raters})"
              for r in p.itertuples()]
    _stacked(ax, labels, [
        (f"prefer {ref}", p["prefer_reference"].to_numpy(), p["prefer_reference_low"].to_numpy(),
         p["prefer_reference_high"].to_numpy(), COLOURS["reference"]),
        ("equal", p["prefer_equal"].to_numpy(), p["prefer_equal"].to_numpy(), p["prefer_equal"].to_numpy(),
         COLOURS["equal"]),
        ("prefer the other", p["prefer_other"].to_numpy(), p["prefer_other"].to_numpy(), p["prefer_other"].to_numpy(),
         COLOURS["other"])], "% of raters (bar: 95% rater-bootstrap interval)")

    sets = analysis.prompt_sets[:2] if len(analysis.prompt_sets) > 1 else analysis.prompt_sets * 2
    for k, (ax, name) in enumerate(zip(axes[1], sets)):
        counts = analysis.counts[analysis.counts["prompt_set"] == name]["comparisons"].to_numpy()
        cutoff = analysis.cutoffs.get(name, np.nan)
        bins = np.arange(0.5, max(counts.max() if len(counts) else 1, 1) + 1.5, max(1, int(np.ceil(
            (counts.max() if len(counts) else 1) / 30))))
        ax.hist(counts, bins=bins, color="#6b8fb3", edgecolor="white")
        ax.axvline(cutoff, color="#c0392b", ls="--", label=f"50th percentile: {cutoff:g} comparisons")
        ax.set_title(f"({'cd'[k]}) comparisons per rater, {name} ({len(counts)} raters)", fontsize=9)
        ax.set_xlabel("comparisons made")
        ax.set_ylabel("raters")
        ax.legend(fontsize=7)
    fig.suptitle(_title(analysis, "Figure 5: human preference study"), fontsize=12,
                 color="#c0392b" if analysis.label != "human" else "black")
    fig.tight_layout()
    return fig


def strengths_figure(analysis: Analysis):
    """Bradley–Terry strengths with rater-bootstrap intervals; the simulation's truth where known."""
    bt = analysis.bt
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(bt.systems) + 1.6))
    y = np.arange(len(bt.systems))
    ax.errorbar(bt.theta, y, xerr=[bt.theta - bt.low, bt.high - bt.theta], fmt="o", capsize=4, label="estimate")
    for name, marker in (("true_population", "x"), ("true_rater_level", "+")):
        truth = bt.truth.get(name) or {}
        if truth:
            centre = np.mean(list(truth.values()))
            ax.scatter([truth.get(s, np.nan) - centre for s in bt.systems], y, marker=marker, color="#c0392b",
                       zorder=3, label={"true_population": "truth (population BT)",
                                        "true_rater_level": "truth (rater-level theta)"}[name])
    ax.set_yticks(y, bt.systems, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Bradley–Terry strength (log scale, centred)")
    ax.set_title(_title(analysis, f"Bradley–Terry with ties (Davidson nu = {bt.nu:.2f})"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def quality_figure(analysis: Analysis):
    """Attention-check failures per rater (with the exclusion line) and the quality numbers."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
    rates = analysis.attention["fail_rate"].dropna().to_numpy() * 100
    axes[0].hist(rates, bins=np.linspace(0, 100, 11), color="#6b8fb3", edgecolor="white")
    axes[0].set_xlabel("attention checks failed per rater (%)")
    axes[0].set_ylabel("raters")
    axes[0].set_title(f"attention checks ({int(analysis.attention['excluded'].sum())} raters excluded)", fontsize=9)
    q = analysis.quality[analysis.quality["metric"].str.endswith("(%)")]
    y = np.arange(len(q))
    low = np.nan_to_num(q["value"] - q["low"])
    high = np.nan_to_num(q["high"] - q["value"])
    axes[1].barh(y, q["value"], xerr=[low, high], color="#9bb7d4", capsize=3)
    axes[1].set_yticks(y, q["metric"], fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 100)
    alpha = analysis.quality.set_index("metric")["value"]
    ordinal = alpha.get("Krippendorff's alpha, ordinal", np.nan)
    nominal = alpha.get("Krippendorff's alpha, nominal", np.nan)
    axes[1].set_title(f"Krippendorff's alpha: ordinal {ordinal:.2f}, nominal {nominal:.2f}", fontsize=9)
    fig.suptitle(_title(analysis, "quality of the data"), fontsize=10)
    fig.tight_layout()
    return fig


def judges_figure(analysis: Analysis):
    """Agreement of raters with each automated judge and with each other (% of judgments, ties half)."""
    j = analysis.judges
    fig, ax = plt.subplots(figsize=(7, 2.6))
    y = np.arange(len(j))
    value = j["agreement"].to_numpy(dtype=float)
    lo = np.nan_to_num(value - j.get("agreement_low", value).to_numpy(dtype=float))
    hi = np.nan_to_num(j.get("agreement_high", value).to_numpy(dtype=float) - value)
    ax.barh(y, np.nan_to_num(value), xerr=[lo, hi], color="#9bb7d4", capsize=3)
    ax.axvline(50, color="grey", ls=":", lw=1)
    ax.set_yticks(y, [f"{r.judge} (n={r.judgments})" for r in j.itertuples()], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("agreement with a rater's judgment (%; ties count half)")
    ax.set_title(_title(analysis, "people and the automated judges"), fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"figure5": figure5, "bradley_terry": strengths_figure, "data_quality": quality_figure,
           "judge_agreement": judges_figure}


def write_report(analysis: Analysis, out: str | os.PathLike) -> dict[str, Path]:
    """``figures/*.png``, ``tables/*.md|csv`` (each with its ``data`` column), ``majority_per_prompt.csv`` and the
    numbers (``analysis.json``) under ``out``."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in FIGURES.items():
        fig = make(analysis)
        written[name] = out / "figures" / f"{name}.png"
        fig.savefig(written[name], dpi=100, bbox_inches="tight")
        plt.close(fig)
    for name, df in analysis.tables().items():
        df.to_csv(out / "tables" / f"{name}.csv", index=False)
        (out / "tables" / f"{name}.md").write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
        written[f"table:{name}"] = out / "tables" / f"{name}.md"
    # one row per prompt and pair: CSV only (the report shows the summary table, not hundreds of rows)
    written["table:majority_per_prompt"] = out / "majority_per_prompt.csv"
    analysis.majority.assign(data=analysis.label).to_csv(written["table:majority_per_prompt"], index=False)
    written["analysis.json"] = out / "analysis.json"
    written["analysis.json"].write_text(dumps(analysis) + "\n")
    return written
