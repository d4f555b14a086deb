"""The paper's Table 1 (pairwise PickScore preference) and Table 2 (cost and quality), and the carbon estimate.

Carbon follows Lacoste et al. (2019) as implemented by the ML CO2 Impact calculator (mlco2/impact
``js/grayscale.js`` ``setDetails``; docs/reference.md#carbon-estimate): energy, grid intensity and emissions are
each rounded to two decimals, with no PUE term. The paper's Würstchen figure is 24,602 A100-hours x 0.25 kW (A100 PCIe)
x 0.37 kg/kWh (AWS us-east-1) = 2,276 kg; SD's model-card figures use 0.30 kg/kWh. Rows measured here are CPU
runs: their cost is CPU core-hours (a column of its own, never "GPU hours") and their carbon comes from a stated
power per core through ``compute.energy_kwh`` and ``compute.carbon_kg`` (unrounded: the calculator's two decimals
would round a CPU toy's grams to zero).
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
from torch import Tensor

from .compute import carbon_kg as carbon_from_kwh
from .compute import energy_kwh
from .preference import win_rate
from .stats import Estimate


def _two_digits(x: float) -> float:
    # The calculator's twoDigits = Number(n.toFixed(2)): the double's exact decimal value, halves away from zero.
    # (Math.round(x*100) would differ: 6150.5 * 0.37 = 2275.68499.. but 2275.68499.. * 100 == 227568.5 exactly.)
    return float(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def carbon_kg(gpu_hours: float, watts: float = 250.0, kg_per_kwh: float = 0.37) -> float:
    """Estimated emissions in kg CO2eq = hours x kW x kg/kWh, with the ML CO2 calculator's rounding."""
    if gpu_hours < 0 or watts <= 0 or kg_per_kwh < 0:
        raise ValueError(f"need gpu_hours >= 0, watts > 0, kg_per_kwh >= 0; got {gpu_hours}, {watts}, {kg_per_kwh}")
    energy_kwh = _two_digits(watts * gpu_hours / 1000)
    return _two_digits(energy_kwh * _two_digits(kg_per_kwh))


def table1(scores: Mapping[str, Tensor], reference: str | None = None, tie_tol: float = 0.0,
           n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Table 1 form: % of prompts on which the row model's image is preferred over the column model's.

    ``scores`` maps model -> per-prompt PickScore (P,), the same prompts for every model (from
    ``preference.pick_scores``). With ``reference`` the table has that one row (the paper's form: Würstchen
    against each other model); otherwise every ordered pair. Cells read ``"64.4 [60.1, 68.7]"`` (95% CI).
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError("Table 1 needs scores of at least two models")
    if len({tuple(s.shape) for s in scores.values()}) != 1:
        raise ValueError("every model must be scored on the same prompts")
    if reference is not None and reference not in scores:
        raise ValueError(f"reference {reference!r} is not one of the scored models {names}")
    rows = [reference] if reference is not None else names
    table = {}
    for a in rows:
        table[a] = {b: _pct(win_rate(scores[a], scores[b], tie_tol, n_boot, seed)) if b != a else "–"
                    for b in names if b != a or reference is None}
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "% preferred over →"
    return df


def _pct(e: Estimate) -> str:
    return f"{e.value:.1f} [{e.low:.1f}, {e.high:.1f}]"


@dataclass(frozen=True)
class Table2Row:
    """One model of Table 2. ``None`` means unknown ("–"); ``carbon_kg=None`` is estimated from ``gpu_hours`` (the
    paper's GPU rows) or ``cpu_core_hours`` (runs here), whichever the row has."""

    model: str
    params: float | None = None
    sampling_steps: int | None = None
    fid: float | Estimate | None = None
    inception_score: float | Estimate | None = None
    gpu_hours: float | None = None
    train_samples: float | None = None
    carbon_kg: float | None = None
    cpu_core_hours: float | None = None


# The paper's Table 2 rows for Würstchen and its baselines (carbon as printed; SD rows from model cards).
PAPER_TABLE2: tuple[Table2Row, ...] = (
    Table2Row("Baseline LDM (paper)", 0.99e9, 60, 43.5, 20.1, 25_000, None, 2_300),
    Table2Row("Würstchen (paper)", 0.99e9, 60, 23.6, 40.9, 24_602, 1.42e9, 2_276),
    Table2Row("SD 1.4 (paper)", 0.8e9, 50, 16.2, 40.6, 150_000, 4.8e9, 11_250),
    Table2Row("SD 2.1 (paper)", 0.8e9, 50, 15.1, 40.1, 200_000, 3.9e9, 15_000),
)


def table2(rows: Sequence[Table2Row], fid_label: str = "FID", is_label: str = "IS", watts: float = 250.0,
           kg_per_kwh: float = 0.37, watts_per_core: float = 10.0) -> pd.DataFrame:
    """Table 2 form: params, sampling steps, FID, IS, training cost, training samples, estimated CO2.

    Metric columns are named by their feature network (``FID_tiny`` is not comparable with Inception
    FID). Estimates give a value column and a ``95% CI`` column. Cost has one column per unit, "GPU hours
    (paper)" and "CPU core-hours (here)"; missing carbon is ``carbon_kg(gpu_hours, watts, kg_per_kwh)`` for a GPU
    row and core-hours x ``watts_per_core`` x ``kg_per_kwh`` (unrounded) for a CPU row.
    """
    if not rows:
        raise ValueError("Table 2 needs at least one row")
    records = []
    for r in rows:
        rec: dict[str, object] = {"Model": r.model, "Params": r.params, "Sampling steps": r.sampling_steps}
        for label, v in ((fid_label, r.fid), (is_label, r.inception_score)):
            rec[label] = v.value if isinstance(v, Estimate) else v
            rec[f"{label} 95% CI"] = f"[{v.low:.4g}, {v.high:.4g}]" if isinstance(v, Estimate) else None
        carbon = r.carbon_kg
        if carbon is None and r.gpu_hours is not None and r.cpu_core_hours is not None:
            raise ValueError(f"{r.model}: give GPU hours or CPU core-hours, not both (their power differs)")
        if carbon is None and r.gpu_hours is not None:
            carbon = carbon_kg(r.gpu_hours, watts, kg_per_kwh)
        if carbon is None and r.cpu_core_hours is not None:
            carbon = carbon_from_kwh(energy_kwh(r.cpu_core_hours, watts_per_core), kg_per_kwh)
        rec.update({"GPU hours (paper)": r.gpu_hours, "CPU core-hours (here)": r.cpu_core_hours,
                    "Train samples": r.train_samples, "Est. carbon [kg CO2eq]": carbon})
        records.append(rec)
    return pd.DataFrame.from_records(records).set_index("Model")
