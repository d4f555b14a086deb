"""Held-out means novel (issue 20): which test prompts' compositions Stage C trained on, and numbers per group.

The test split alternates compositions reserved for it (``data.procedural.is_novel``: never rendered for training,
by construction) and compositions drawn as training ones. A test prompt is "seen" when its composition occurs among
the items the latest ``05_stage_c`` run actually drew: its stream, batch size, steps and seed replayed through the
training loop's batch order. Notebook 07 reports every compositional and quality number for the two groups apart,
and measures the claims on the novel group.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..data import make_dataset
from ..data.procedural import composition_key, is_novel
from ..evaluation.image_metrics import FeatureSet, kid
from ..evaluation.stats import mean_ci
from ..runs import latest_run
from ..training.loop import batch_indices

NOVEL, SEEN = "novel (never trained on)", "seen (in Stage C's training stream)"


def trained_indices(n: int, batch_size: int, steps: int, seed: int) -> set[int]:
    """Every dataset index the training loop drew in ``steps`` steps (its seeded epoch permutations)."""
    out: set[int] = set()
    for step in range(steps):
        out.update(batch_indices(n, batch_size, step, seed))
    return out


def seen_compositions(profile: str, dataset: str) -> tuple[set[str], str]:
    """The compositions of every item the latest ``05_stage_c`` run of ``profile`` trained on, and a note saying
    which run (an empty set, and why, without a run on ``dataset``)."""
    run = latest_run("05_stage_c", profile)
    if run is None:
        return set(), "no 05_stage_c run: nothing is seen"
    cfg = json.loads((run.dir / "config.json").read_text())
    if cfg.get("dataset") != dataset:
        return set(), f"05_stage_c/{run.run_id} trained on {cfg.get('dataset')!r}, not {dataset!r}"
    steps = int(run.metrics().get("steps", cfg["steps"]))
    data = make_dataset(dataset, size=int(cfg["n_train"]), resolution=8, seed=int(cfg["seed"]), split="train")
    drawn = trained_indices(len(data), int(cfg["batch_size"]), steps, int(cfg["seed"]))
    keys = {composition_key(data.attributes(i)) for i in drawn}
    return keys, (f"05_stage_c/{run.run_id}: {len(drawn)} distinct training items, {len(keys)} distinct "
                  f"compositions")


def composition_groups(truths: Sequence[Mapping[str, Any]], seen: set[str]) -> dict[str, Tensor]:
    """Boolean masks over the test prompts: novel (reserved for test) and seen (composition trained on)."""
    return {NOVEL: torch.tensor([is_novel(dict(t)) for t in truths]),
            SEEN: torch.tensor([composition_key(dict(t)) in seen for t in truths])}


def subset_features(features: FeatureSet, mask: Tensor) -> FeatureSet:
    return FeatureSet(features.features[mask], features.logits[mask], features.label)


def group_table(checks: Mapping[str, Mapping[str, Tensor]], features: Mapping[str, FeatureSet], real: FeatureSet,
                groups: Mapping[str, Tensor], n_boot: int, seed: int = 0) -> pd.DataFrame:
    """Per generator and group: prompts, all-correct accuracy (%) and KID_tiny against the real sample, with CIs."""
    rows = []
    for name, c in checks.items():
        for group, mask in groups.items():
            n = int(mask.sum())
            row = {"generator": name, "group": group, "prompts": n}
            if n >= 2:  # KID's unbiased estimate needs two images
                row["all_correct"] = str(mean_ci(c["all_correct"][mask].float(), n_boot=n_boot, seed=seed, scale=100))
                row["KID_tiny"] = str(kid(real, subset_features(features[name], mask), n_boot=n_boot, seed=seed))
            rows.append(row)
    return pd.DataFrame(rows).set_index("generator")


def masked(values: Mapping[str, Any], mask: Tensor) -> dict[str, Any]:
    """``{name: per-prompt tensor or dict of them}`` restricted to the prompts of ``mask``."""
    return {k: (masked(v, mask) if isinstance(v, Mapping) else v[mask]) for k, v in values.items()}
