"""The training-cost claim's measurement for notebook 07: the baseline along its training FLOPs.

``08_baseline`` keeps each seed's EMA weights at fractions of its steps (its ``snapshots``). Here every snapshot
samples the novel held-out prompts, each with the per-prompt seed that its final weights drew it with, and the
probe reads them: the baseline's attribute share against its training FLOPs, beside Würstchen's seeds at Stage C's
budget. Where the curve first reaches Würstchen's level, over Stage C's FLOPs, is what
:data:`studies.claims.CHEAPER` judges (:func:`studies.claims.matching_budget`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..evaluation import generators as gens
from ..evaluation.probe import attribute_share, compositional_accuracy
from ..evaluation.stats import Estimate
from .baseline import TrainedBaseline
from .claims import MIN_BOOT, matching_budget


@dataclass
class TrainingCurve:
    """The baseline's attribute share on the novel prompts along its training FLOPs, beside Würstchen's: what the
    training-cost claim reads (:func:`studies.claims.matching_budget`)."""

    fractions: list[float]                # training FLOPs over Stage C's, per checkpoint (the last: final weights)
    steps: list[int]                      # the baseline's steps at each checkpoint
    baseline: dict[int, list[float]]      # training seed -> mean attribute share (%) per checkpoint
    model: dict[str, float]               # Würstchen (per seed) -> mean attribute share (%)
    stage_bc_over_c: float                # Stage B + C's training FLOPs over Stage C's
    matched: Estimate                     # the claim's measurement: FLOPs of the match over Stage C's

    def table(self) -> pd.DataFrame:
        rows = [{"baseline step": t, "FLOPs / Stage C's": f, "FLOPs / Stage B + C's": f / self.stage_bc_over_c,
                 **{f"seed {s}: attribute share (%)": v[k] for s, v in self.baseline.items()},
                 "mean (%)": float(np.mean([v[k] for v in self.baseline.values()]))}
                for k, (t, f) in enumerate(zip(self.steps, self.fractions))]
        return pd.DataFrame.from_records(rows).set_index("baseline step")

    def numbers(self) -> dict[str, Any]:
        return {"fractions": self.fractions, "steps": self.steps,
                "baseline": {f"seed{s}": v for s, v in self.baseline.items()}, "model": self.model,
                "stage_bc_over_c": self.stage_bc_over_c, "matched": self.matched.as_dict()}


def training_curve(baseline: TrainedBaseline, checks: Mapping[str, Mapping[str, Tensor]], models: list[str],
                   seeds: list[str], positions: list[int], prompts: list[str], truths: list[Any], probe: Any,
                   res: int, sampling_seed: int, n_boot: int, log: Callable[[str], None]) -> TrainingCurve | None:
    """Sample the baseline's snapshots (08) on the novel prompts at ``positions`` (each with the per-prompt seed
    of its position, as the final weights were), read them with the probe, and place the final weights and
    Würstchen's seeds (``models``, paired in order with ``seeds``) beside them; None when 08 kept no snapshots."""
    steps = sorted({t for _, t in baseline.snapshots})
    if not steps or not baseline.stage_c_flops or not baseline.flops_per_step:
        return None
    sub_prompts, sub_truths = [prompts[i] for i in positions], [truths[i] for i in positions]
    curve = []  # (K, S, P) per-prompt attribute share, snapshots then the final weights
    for t in steps:
        per_seed = []
        for s in baseline.unets:
            g = gens.reindexed(gens.per_prompt_generator(functools.partial(baseline.sample, s, step=t), sampling_seed),
                               positions)
            imgs = gens.generate(g, sub_prompts, batch_size=16, size=res)
            per_seed.append(100 * attribute_share(compositional_accuracy(probe, imgs, sub_truths, n_boot,
                                                                         sampling_seed).checks))
        curve.append(torch.stack(per_seed))
        log(f"baseline at step {t}: attribute share " + ", ".join(f"{float(x.mean()):.1f} %" for x in per_seed))
    idx = torch.as_tensor(positions)
    curve.append(torch.stack([100 * attribute_share(checks[b])[idx] for b in seeds]))
    model = torch.stack([100 * attribute_share(checks[m])[idx] for m in models])
    all_steps = [*steps, baseline.steps]
    fractions = [t * baseline.flops_per_step / baseline.stage_c_flops for t in all_steps]
    c = torch.stack(curve)
    matched = matching_budget(model, c, fractions, n_boot=max(n_boot, MIN_BOOT), seed=sampling_seed)
    return TrainingCurve(fractions, all_steps, {s: c[:, i].mean(1).tolist() for i, s in enumerate(baseline.unets)},
                         {m: float(model[i].mean()) for i, m in enumerate(models)},
                         baseline.stage_bc_flops / baseline.stage_c_flops, matched)


def training_curve_figure(curve: TrainingCurve):
    """Attribute share against training FLOPs: the baseline's checkpoints per seed, Würstchen's seeds at Stage C's
    budget (x = 1) and Stage B + C's."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for s, v in curve.baseline.items():
        ax.plot(curve.fractions, v, marker="o", lw=1, label=f"baseline LDM, seed {s}")
    for i, (m, v) in enumerate(curve.model.items()):
        ax.axhline(v, color=f"C{len(curve.baseline) + i}", ls="--", lw=1, label=f"{m}, at x = 1")
    ax.axvline(1.0, color="0.6", lw=0.8)
    ax.axvline(curve.stage_bc_over_c, color="0.6", lw=0.8, ls=":")
    ticks = sorted({*curve.fractions, curve.stage_bc_over_c})
    ax.set(xscale="log", xlabel="training FLOPs / Stage C's (dotted: Stage B + C's)",
           ylabel="attribute share, novel prompts (%)")
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())  # the log axis' minor labels overlap the checkpoints'
    matched = curve.matched
    ax.set_title(f"the baseline matches Würstchen at {matched} x Stage C's FLOPs" if np.isfinite(matched.high) else
                 f"the baseline does not reach Würstchen's level within {max(curve.fractions):.3g} x Stage C's FLOPs"
                 if not np.isfinite(matched.low) else
                 f"the baseline matches Würstchen at {matched.value:.3g} x Stage C's FLOPs or later", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def curve_detail(curve: TrainingCurve, baseline: TrainedBaseline, n_novel: int) -> str:
    """The checkpoints behind the training-cost claim, in words."""
    bc = Estimate(*(x / curve.stage_bc_over_c for x in (curve.matched.value, curve.matched.low, curve.matched.high)))
    return (f"{baseline.run.notebook}/{baseline.run.run_id}, baseline checkpoints at "
            f"{', '.join(f'{f:.3g}' for f in curve.fractions)} x Stage C's FLOPs (steps {curve.steps}), seeds "
            f"{list(curve.baseline)}, {n_novel} novel prompts; over Stage B + C's FLOPs: {bc}")
