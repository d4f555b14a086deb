"""The evaluation study of ``notebooks/07_evaluation.ipynb``: every generator against held-out prompts.

Generators (one image per held-out prompt, split "test"): the ground-truth renders (ceiling), a Würstchen pipeline
(the latest ``05_stage_c`` run, or ``weights_dir``; random weights when neither exists), the renders of other
prompts (chance adherence at real-image quality) and noise. For each: compositional accuracy (probe), FID_tiny /
KID_tiny against an independent real sample (split "val"), IS_tiny, CLIP score and PickScore-style preference with
a judge CLIP trained apart from the conditioning text encoder (another seed, other training scenes) or
PickScore_v1 from a local folder; the standard Inception FID/KID/IS when a weights file is given. Every number
has a bootstrap CI; KID is the headline quality number (FID is only comparable between sets of equal size). Tables
follow the paper's Table 1 (preference) and Table 2 (cost and quality). Our runs are CPU runs: their cost is CPU
core-hours of every training phase (train seconds x worker processes), their energy and carbon come from an assumed
power per core; the paper's GPU hours and carbon stay in the paper's rows.

The baseline LDM: when the profile has a finished ``08_baseline`` run budgeted on the ``05_stage_c`` run evaluated
here, each of its training seeds is one more generator on the same prompts, and every sampled system (Würstchen and
each seed) draws prompt ``i`` with a generator seeded from ``(seed, i)``; Würstchen is then compared with each seed
prompt by prompt (``studies.claims``), which measures the first row of the claims table. Without such a run the
generators, their noise and every number are as before, and the claims table says why the row is not measured.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import Tensor

from .. import params, paths
from ..data.stream import load_images
from ..evaluation import compute
from ..evaluation import generators as gens
from ..evaluation.claims import Claim, claims_table
from ..evaluation.image_metrics import (InceptionExtractor, ProbeExtractor, extract, image_quality,
                                        paired_kid_difference)
from ..evaluation.preference import ClipJudge, clip_score, load_pickscore, pick_scores
from ..evaluation.probe import PROBE_SIZES, ProbeTraining, compositional_accuracy, probe_spec, train_probe
from ..evaluation.stats import Estimate
from ..evaluation.tables import PAPER_TABLE2, Table2Row, carbon_kg, table1, table2
from ..models import count_parameters
from ..params import param
from ..runs import Run, latest_run
from ..text import CLIP_TRAINING, load_tiny_clip, train_and_save_tiny_clip
from .baseline import TrainedBaseline, latest_baseline_run, load_trained_baseline
from .claims import (BaselineComparison, claim_from_run, claims_records, compare_with_baseline, measured_claims,
                     speed_ratio)
from .claims import stated_claims as _stated_here
from .compression import SEMANTICS
from .objective import P2_WEIGHTING, STABILITY
from .figures import image_grid
from .heldout import NOVEL, composition_groups, group_table, masked, seen_compositions, subset_features
from .phases import run_log
from .sampling import SamplingParams, load_sampling_pipeline
from .training_cost import TrainingCurve, curve_detail, training_curve

REAL = "real (ground truth)"
SHUFFLED = "real, other prompt"
NOISE = "noise"
NO_BASELINE = "no 08_baseline run yet"


@dataclass(frozen=True)
class EvaluationParams:
    """Parameters of ``notebooks/07_evaluation.ipynb``; 0 / "" take the profile's value."""

    profile: str = params.choice("tiny", *params.PROFILES)
    dataset: str = params.choice("procedural", "procedural", "emoji")
    weights_dir: str = ""           # Pipeline folder to evaluate ("": latest 05_stage_c run, else random weights)
    n_prompts: int = param(0, ge=2)                # held-out prompts, one image per prompt and generator
    resolution: int = param(0, ge=0, le=4096)      # evaluation image size (0: the trained pipeline's, else 64)
    sample_size: int = param(0, ge=0, le=4096)     # generation size (0: the pipeline's training size)
    prior_steps: int = param(0, ge=1, le=1000)     # tau_C (paper: 60)
    decoder_steps: int = param(0, ge=1, le=1000)   # tau_B (paper: 12)
    prior_guidance: float | None = param(None, ge=0)  # Stage C guidance (paper: 4; None: the pipeline's own)
    probe_size: str = params.choice("", *PROBE_SIZES)  # size of the probe / feature network
    probe_images: int = param(0, ge=1)             # real training images of the probe (split "train")
    probe_steps: int = param(0, ge=1)              # probe optimiser steps
    judge_dir: str = ""             # local PickScore_v1 folder (a transformers CLIPModel); "": the tiny judge CLIP
    judge_processor_dir: str = ""   # its processor files (laion CLIP-H tokenizer + preprocessor_config.json)
    judge_steps: int = param(0, ge=1)              # training steps of the tiny judge CLIP
    inception_weights: str = ""     # torch-fidelity Inception weights file: adds the standard FID/KID/IS
    is_splits: int = param(0, ge=1)                # Inception Score splits
    n_boot: int = param(0, ge=1)                   # bootstrap resamples per metric
    watts_per_core: float = param(10.0, gt=0)      # assumed CPU power per busy core (W) for our runs' energy/carbon
    watts: float = param(250.0, gt=0)              # GPU power, only to recompute the paper's carbon (A100 PCIe, 250 W)
    kg_per_kwh: float = param(0.37, ge=0)          # grid carbon intensity (paper: 0.37, AWS us-east-1)
    seed: int = param(0, ge=0)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {
            "smoke": dict(n_prompts=12, prior_steps=2, decoder_steps=2, probe_size="smoke", probe_images=200,
                          probe_steps=20, judge_steps=10, is_splits=2, n_boot=20),
            "tiny": dict(n_prompts=256, prior_steps=60, decoder_steps=12, probe_size="tiny", probe_images=4000,
                         probe_steps=800, judge_steps=300, is_splits=4, n_boot=200),
            "paper": dict(n_prompts=2000, prior_steps=60, decoder_steps=12, probe_size="base", probe_images=20000,
                          probe_steps=3000, judge_steps=20000, is_splits=10, n_boot=1000),
        }[profile]


@dataclass
class EvaluationResult:
    prompts: list[str]
    images: dict[str, Tensor]                     # generator -> (P,3,R,R)
    estimates: dict[str, dict[str, Estimate]]     # generator -> metric -> estimate
    probe_ceiling: dict[str, Estimate]            # the probe on held-out real images (compositional ceiling)
    tables: dict[str, pd.DataFrame]
    info: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)  # CPU core-hours per training phase, energy and carbon
    claims: list[Claim] = field(default_factory=list)     # the paper's claims, 07's measurement filled in
    baseline: dict[str, Any] | str = NO_BASELINE          # the 08 run compared with, or why none was
    comparison: BaselineComparison | None = None          # Würstchen against each baseline seed, prompt by prompt
    curve: TrainingCurve | None = None                    # the baseline along its training FLOPs (08's snapshots)

    def summary(self) -> pd.DataFrame:
        """One row per generator: the headline numbers (CIs in ``tables``). KID leads the quality numbers; FID
        follows, labelled as comparable only between sets of equal size (its bias depends on the sample size)."""
        keys = [k for k in ("KID_tiny", "all_correct", "CLIP_score", "FID_tiny", "IS_tiny", "KID", "FID", "IS")
                if k in next(iter(self.estimates.values()))]
        rows = {"probe ceiling (real images)": {"all_correct": self.probe_ceiling["all_correct"].value},
                **{n: {k: e[k].value for k in keys} for n, e in self.estimates.items()}}
        labels = {k: f"{k} (equal-size sets only)" for k in ("FID_tiny", "FID")}
        return pd.DataFrame(rows).T[keys].rename(columns=labels)

    def metrics(self) -> dict[str, Any]:
        """Numbers for ``metrics.json``: {generator: {metric: value, metric_ci: [low, high]}} plus info."""
        out: dict[str, Any] = {"info": self.info,
                               "probe_ceiling": {k: v.value for k, v in self.probe_ceiling.items()},
                               "training_cost": self.costs, "claims": claims_records(self.claims),
                               "baseline": self.baseline}
        for name, est in self.estimates.items():
            out[name] = {k: v.value for k, v in est.items()}
            out[name].update({f"{k}_ci": [v.low, v.high] for k, v in est.items()})
        return out


def judge_for(p: EvaluationParams, log: Callable[[str], None]) -> tuple[ClipJudge, str]:
    """PickScore_v1 from ``judge_dir``, else the tiny judge CLIP (trained once per profile and seed, then cached).

    The judge must not be the conditioning encoder: it is trained with seed ``1000 + seed`` (other weights and
    other training scenes than notebook 01's seed-0 CLIP).
    """
    if p.judge_dir:
        return load_pickscore(p.judge_dir, p.judge_processor_dir or None), f"PickScore_v1 ({p.judge_dir})"
    judge_seed = 1000 + p.seed
    training = dataclasses.replace(CLIP_TRAINING[p.profile], steps=p.judge_steps)
    # the cache is keyed by the whole training recipe: a changed recipe trains a new judge
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(training), sort_keys=True).encode()).hexdigest()[:8]
    directory = paths.cache_dir() / p.profile / f"judge_clip_seed{judge_seed}_steps{p.judge_steps}_{digest}"
    if not (directory / "model.json").is_file():
        log(f"training the judge CLIP (seed {judge_seed}, {p.judge_steps} steps) ...")
        train_and_save_tiny_clip(p.profile, seed=judge_seed, progress=False, directory=directory, training=training)
    model, _, meta = load_tiny_clip(directory)
    t2i = meta.get("retrieval", {}).get("t2i_top1")
    return ClipJudge.from_open_clip(model, name="tiny judge CLIP"), f"tiny judge CLIP, seed {judge_seed} (t2i top-1 {t2i})"


def _pipeline(p: EvaluationParams) -> tuple[Any, dict[str, Any]]:
    return load_sampling_pipeline(SamplingParams(profile=p.profile, weights_dir=p.weights_dir, size=p.sample_size,
                                                 seed=p.seed))


# the training phases behind a trained pipeline, with the table's label of each
TRAINING_PHASES = {"01_text_encoder": "text encoder (tiny CLIP)", "03_stage_a": "Stage A",
                   "04_stage_b": "Stage B + compressor", "05_stage_c": "Stage C"}


def _phase_cost(notebook: str, profile: str) -> dict[str, Any] | None:
    """CPU cost of the latest run of a training notebook: train seconds x worker processes (one core each)."""
    run = latest_run(notebook, profile)
    if run is None:
        return None
    m, cfg = run.metrics(), json.loads((run.dir / "config.json").read_text())
    seconds = m.get("train_seconds")
    workers = int(cfg.get("workers") or 1)  # 01 trains in one process; 03-05 in `workers` forked processes
    return {"run": f"{notebook}/{run.run_id}", "train_seconds": seconds, "workers": workers,
            "core_hours": compute.core_hours(seconds, workers) if seconds is not None else None,
            "steps": m.get("steps", cfg.get("steps")), "batch": cfg.get("batch_size"),
            "grad_accum": cfg.get("grad_accum", 1)}


def _training_costs(p: EvaluationParams) -> dict[str, dict[str, Any] | None]:
    """Every training phase's CPU cost (None: no run, or ``weights_dir`` names weights not trained here)."""
    if p.weights_dir:
        return {nb: None for nb in TRAINING_PHASES}
    return {nb: _phase_cost(nb, p.profile) for nb in TRAINING_PHASES}


def _energy(core_hours: float | None, p: EvaluationParams) -> tuple[float | None, float | None]:
    # kWh at the assumed watts per core, then kg CO2eq at the grid's intensity (unrounded: grams matter here)
    if core_hours is None:
        return None, None
    kwh = compute.energy_kwh(core_hours, p.watts_per_core)
    return kwh, compute.carbon_kg(kwh, p.kg_per_kwh)


def _cost_table(phases: dict[str, dict[str, Any] | None], p: EvaluationParams) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The CPU cost of every training phase and their total (total unknown when any phase is), as a table and as
    numbers for ``metrics.json``."""
    hours = {nb: (c or {}).get("core_hours") for nb, c in phases.items()}
    total = None if any(h is None for h in hours.values()) else sum(hours.values())
    rows = []
    for nb, c in phases.items():
        c, (kwh, kg) = c or {}, _energy(hours[nb], p)
        rows.append({"phase": TRAINING_PHASES[nb], "run": c.get("run"), "train seconds": c.get("train_seconds"),
                     "workers": c.get("workers"), "CPU core-hours": hours[nb], "energy [kWh]": kwh,
                     "est. carbon [kg CO2eq]": kg})
    kwh, kg = _energy(total, p)
    rows.append({"phase": "total", "run": "", "train seconds": None, "workers": None, "CPU core-hours": total,
                 "energy [kWh]": kwh, "est. carbon [kg CO2eq]": kg})
    numbers = {"core_hours": {**hours, "total": total}, "energy_kwh": kwh, "carbon_kg": kg,
               "watts_per_core": p.watts_per_core, "kg_per_kwh": p.kg_per_kwh}
    return pd.DataFrame.from_records(rows).set_index("phase"), numbers


def baseline_run_for(p: EvaluationParams, trained: bool, budget: str = "stage_c") -> tuple[Run | None, str]:
    """The ``08_baseline`` run at ``budget`` to evaluate beside Würstchen and its name, or None and why not: the
    profile has no finished 08 run at that budget; Würstchen was not trained here (``weights_dir`` or random
    weights: 08 matched the compute of this workbench's Stage C); or 08 was budgeted on another ``05_stage_c`` run
    than the one evaluated."""
    run = latest_baseline_run(p.profile, budget)
    if run is None:
        return None, NO_BASELINE if budget == "stage_c" else f"no 08_baseline run at budget {budget}"
    if p.weights_dir or not trained:
        what = f"weights_dir {p.weights_dir}" if p.weights_dir else "random weights"
        return None, (f"Würstchen is not this workbench's trained Stage C ({what}): 08_baseline/{run.run_id} was "
                      "trained at that Stage C's compute")
    budgeted = run.metrics().get("upstream", {}).get("stage_c")
    stage_c = latest_run("05_stage_c", p.profile)
    evaluated = f"05_stage_c/{stage_c.run_id}" if stage_c is not None else None
    if budgeted != evaluated:
        return None, f"08_baseline/{run.run_id} was budgeted on {budgeted}, this evaluation samples {evaluated}"
    return run, f"08_baseline/{run.run_id}"


def baseline_name(seed: int, budget: str = "stage_c") -> str:
    return f"baseline LDM (seed {seed})" if budget == "stage_c" else f"baseline LDM, Stage B + C's FLOPs (seed {seed})"


def _baseline_generators(baseline: TrainedBaseline | None, seed: int) -> dict[str, gens.Generator]:
    # one generator per training seed, each drawing prompt i from the seed that Würstchen's prompt i gets
    if baseline is None:
        return {}
    return {baseline_name(s, baseline.budget): gens.per_prompt_generator(functools.partial(baseline.sample, s), seed)
            for s in baseline.unets}


def stage_c_name(seed: int) -> str:
    return f"Würstchen (Stage C seed {seed}, 08)"


def _stage_c_seed_generators(baseline: TrainedBaseline | None, p: EvaluationParams,
                             size: int) -> dict[str, gens.Generator]:
    """Würstchen with each Stage C that 08 trained from another seed, sampled exactly as the 05 pipeline (at its
    ``size``: a weights folder alone would be sampled at the released 1024 px)."""
    if baseline is None:
        return {}
    out = {}
    for seed, folder in baseline.stage_c_pipelines.items():
        pipe, info = load_sampling_pipeline(SamplingParams(profile=p.profile, weights_dir=str(folder), seed=p.seed,
                                                           size=size))
        out[stage_c_name(seed)] = gens.pipeline_generator(pipe, int(info["size"]), p.prior_steps, p.decoder_steps,
                                                          p.prior_guidance, seed=p.seed, per_prompt=True)
    return out


def _baseline_rows(baseline: TrainedBaseline | None) -> dict[str, dict[str, Any]]:
    """Table 2 cells of each baseline seed: parameters, sampling steps, CPU core-hours and training samples."""
    if baseline is None:
        return {}
    m, cfg = baseline.run.metrics(), json.loads((baseline.run.dir / "config.json").read_text())
    workers = int(cfg.get("workers") or 1)
    return {baseline_name(s, baseline.budget): dict(
                params=float(count_parameters(unet)), sampling_steps=baseline.sample_steps,
                cpu_core_hours=compute.core_hours(m["train_seconds"][f"seed{s}"], workers),
                train_samples=int(m["steps"]) * int(cfg["batch_size"]))
            for s, unet in baseline.unets.items()}


def _baseline_detail(baseline: TrainedBaseline, n_prompts: int) -> dict[str, Any]:
    m = baseline.run.metrics()
    return {"run": f"08_baseline/{baseline.run.run_id}", "budget": m.get("budget"),
            "budget_ratio": m.get("budget_ratio"), "steps": m.get("steps"), "seeds": list(baseline.unets),
            "stage_c_seeds": list(baseline.stage_c_pipelines), "sample_steps": baseline.sample_steps,
            "guidance": baseline.guidance, "n_prompts": n_prompts}


def run_evaluation(p: EvaluationParams, run: Run | None = None, progress: bool = False) -> EvaluationResult:
    """The whole study (see the module docstring); ``run``: where the log goes (tables: :func:`save_outputs`)."""
    log = run_log(progress, run)
    t0 = time.time()
    pipe, pipe_info = _pipeline(p)
    trained = bool(pipe_info.get("trained"))
    res = p.resolution or (int(pipe_info["size"]) if trained else 64)
    model_name = "Würstchen (trained)" if trained else "Würstchen (random weights)"
    log(f"pipeline: {pipe_info['weights']}; evaluation at {res} px")
    baseline_run, baseline_note = baseline_run_for(p, trained)
    baseline = load_trained_baseline(baseline_run) if baseline_run is not None else None
    log(f"baseline: {baseline_note}")
    bc_run, bc_note = baseline_run_for(p, trained, "stage_bc")  # the second equal-compute row, beside the first
    baseline_bc = load_trained_baseline(bc_run) if bc_run is not None and baseline is not None else None

    # held-out prompts with their ground truth, an independent real sample for FID, the probe's training images
    test = load_images(p.dataset, p.n_prompts, res, p.seed, "test", progress=False)
    prompts, truths = test["caption"], test["attributes"]
    seen, seen_note = seen_compositions(p.profile, p.dataset) if trained and not p.weights_dir else (set(), "")
    groups = composition_groups(truths, seen)
    log("held-out prompts: " + ", ".join(f"{g} {int(m.sum())}" for g, m in groups.items()) + f" ({seen_note})")
    reference = load_images(p.dataset, p.n_prompts, res, p.seed, "val", progress=False)["image"]
    cfg = PROBE_SIZES[p.probe_size]
    train = load_images(p.dataset, p.probe_images, cfg.resolution, p.seed, "train", progress=False)
    probe = train_probe(train["image"], train["attributes"], probe_spec(p.dataset), cfg,
                        ProbeTraining(steps=p.probe_steps, seed=p.seed), log=log)
    ceiling = compositional_accuracy(probe, test["image"], truths, p.n_boot, p.seed).accuracy
    log(f"probe ceiling on held-out real images: all-correct {ceiling['all_correct']}")

    paired = baseline is not None  # with a baseline, Würstchen too draws prompt i from the seed (seed, i)
    generators: dict[str, gens.Generator] = {
        REAL: gens.lookup_generator(prompts, test["image"]),
        model_name: gens.pipeline_generator(pipe, int(pipe_info["size"]), p.prior_steps, p.decoder_steps,
                                            p.prior_guidance, seed=p.seed, per_prompt=paired),
        **_stage_c_seed_generators(baseline, p, int(pipe_info["size"])),
        **_baseline_generators(baseline, p.seed),
        **_baseline_generators(baseline_bc, p.seed),
        SHUFFLED: gens.shuffled_generator(prompts, test["image"], p.seed),
        NOISE: gens.noise_generator(res, p.seed),
    }
    images, batch_seconds = {}, {}
    for name, g in generators.items():
        t = time.time()
        batch_seconds[name] = []  # per batch: Würstchen's and the baseline's inference cost on the same batches
        images[name] = gens.generate(g, prompts, batch_size=16, size=res, seconds=batch_seconds[name])
        log(f"generated {len(prompts)} images with {name!r} in {time.time() - t:.1f} s")

    judge, judge_name = judge_for(p, log)
    inception = InceptionExtractor(p.inception_weights) if p.inception_weights else None
    extractors = [ProbeExtractor(probe)] + ([inception] if inception is not None else [])
    real_sets = [extract(x, reference) for x in extractors]
    estimates: dict[str, dict[str, Estimate]] = {}
    checks: dict[str, dict[str, Tensor]] = {}  # per-prompt checks, for the paired comparison with the baseline
    probe_features = {}  # probe features per generator, for the paired KID difference with the baseline
    for name, imgs in images.items():
        composition = compositional_accuracy(probe, imgs, truths, p.n_boot, p.seed)
        est, checks[name] = dict(composition.accuracy), composition.checks
        for x, real in zip(extractors, real_sets):
            fake = extract(x, imgs)
            probe_features.setdefault(name, fake)
            est.update(image_quality(real, fake, splits=p.is_splits, n_boot=p.n_boot, seed=p.seed))
        est["CLIP_score"] = clip_score(judge, prompts, imgs, p.n_boot, p.seed)
        estimates[name] = est
        log(f"{name}: all-correct {est['all_correct']}, KID_tiny {est['KID_tiny']}, FID_tiny {est['FID_tiny']}")
    scores = pick_scores(judge, prompts, images)

    phases = _training_costs(p)
    cost_table, costs = _cost_table(phases, p)
    c = phases["05_stage_c"] or {}
    # batch_size is the global batch (grad_accum splits it into micro-batches): steps x batch samples
    samples = c["steps"] * c["batch"] if c.get("steps") and c.get("batch") else None
    # random weights trained nothing; a trained pipeline counts its 05 run (unknown for weights_dir)
    stage_c_hours, stage_c_samples = (c.get("core_hours"), samples) if trained else (0.0, 0)
    rows, baseline_rows = [], {**_baseline_rows(baseline), **_baseline_rows(baseline_bc)}
    for name, est in estimates.items():
        row = Table2Row(name, fid=est["FID_tiny"], inception_score=est["IS_tiny"])
        if name == model_name:  # Table 2 counts Stage C: its parameters, steps, CPU core-hours and samples
            row = dataclasses.replace(row, params=float(sum(q.numel() for q in pipe.stage_c.parameters())),
                                      sampling_steps=p.prior_steps, cpu_core_hours=stage_c_hours,
                                      train_samples=stage_c_samples)
        row = dataclasses.replace(row, **baseline_rows.get(name, {}))
        rows.append(row)
    tables = {
        "table1_preference": table1(scores, reference=model_name if trained else None, n_boot=p.n_boot, seed=p.seed),
        "table2_cost_quality": table2(rows, "FID_tiny", "IS_tiny", kg_per_kwh=p.kg_per_kwh,
                                      watts_per_core=p.watts_per_core),
        "training_cost": cost_table,
        "table2_paper": table2(PAPER_TABLE2),
        "compositional": _estimates_table({"probe on real images (ceiling)": ceiling,
                                           **{n: e for n, e in estimates.items()}},
                                          [k for k in ceiling]),
        "quality": _estimates_table(estimates, _quality_keys(estimates, ceiling)),
        "novel_vs_seen": group_table(checks, probe_features, real_sets[0], groups, p.n_boot, p.seed),
    }
    claims = measured_claims(None, baseline_note, others=ablation_claims(p.profile))
    baseline_info, comparison, curve = baseline_note, None, None
    if baseline is not None:
        seeds = [baseline_name(s, baseline.budget) for s in baseline.unets]
        # Würstchen's seeds pair with the baseline's in order when 08 trained as many Stage C seeds as there are
        models = [model_name, *(stage_c_name(s) for s in baseline.stage_c_pipelines)]
        models = models if len(models) == len(seeds) else [model_name] * len(seeds)
        comparisons = {}
        for group, mask in groups.items():  # the claims read the novel group: held-out means never trained on
            if int(mask.sum()) < 2:  # a paired KID needs two prompts
                continue
            kid = paired_kid_difference(real_sets[0], [subset_features(probe_features[m], mask) for m in models],
                                        [subset_features(probe_features[b], mask) for b in seeds],
                                        n_boot=max(p.n_boot, 1000), seed=p.seed)
            comparisons[group] = compare_with_baseline(masked(checks, mask), masked(scores, mask), models, seeds,
                                                       p.n_boot, p.seed, kid=kid)
        detail = _baseline_detail(baseline, int(groups[NOVEL].sum()))
        baseline_info = {**detail, **{f"paired_{'novel' if g == NOVEL else 'seen'}": c.numbers()
                                      for g, c in comparisons.items()}}
        tables.update({f"baseline_comparison{'' if g == NOVEL else '_seen'}": c.table()
                       for g, c in comparisons.items()})
        comparison = comparisons.get(NOVEL)
        speed = speed_ratio(_mean_seconds(batch_seconds, models), _mean_seconds(batch_seconds, seeds), p.n_boot,
                            p.seed)
        speed_detail = (f"{len(prompts)} prompts in batches of 16 at {res} px, Würstchen {p.prior_steps}+"
                        f"{p.decoder_steps} steps, the baseline {baseline.sample_steps} steps")
        baseline_info["seconds_per_image"] = {n: sum(batch_seconds[n]) / len(prompts) for n in [*models, *seeds]}
        novel = [i for i, m in enumerate(groups[NOVEL].tolist()) if m]
        curve = training_curve(baseline, checks, models, seeds, novel, prompts, truths, probe, res, p.seed,
                               p.n_boot, log) if len(novel) >= 2 else None
        cheaper_detail = (f"{baseline.run.notebook}/{baseline.run.run_id} kept no snapshots (rerun 08_baseline)"
                          if curve is None else curve_detail(curve, baseline, len(novel)))
        if curve is not None:
            baseline_info["training_curve"] = curve.numbers()
            tables["training_curve"] = curve.table()
        comparison_bc = None
        if baseline_bc is not None and len(novel) >= 2:  # Würstchen's seeds paired in order, as above
            seeds_bc = [baseline_name(s, baseline_bc.budget) for s in baseline_bc.unets]
            models_bc = models if len(models) == len(seeds_bc) else [model_name] * len(seeds_bc)
            comparison_bc = compare_with_baseline(masked(checks, groups[NOVEL]), masked(scores, groups[NOVEL]),
                                                  models_bc, seeds_bc, p.n_boot, p.seed)
            tables["baseline_comparison_stage_bc"] = comparison_bc.table()
            baseline_info["paired_novel_stage_bc"] = comparison_bc.numbers()
            bc_note = _claim_detail(_baseline_detail(baseline_bc, len(novel)), p.seed)
        claims = measured_claims(comparison, _claim_detail(detail, p.seed) if comparison else "< 2 novel prompts",
                                 speed, speed_detail, ablation_claims(p.profile),
                                 cheaper=curve.matched if curve is not None else None, cheaper_detail=cheaper_detail,
                                 comparison_bc=comparison_bc, detail_bc=bc_note)
        if comparison is not None:
            log(f"Würstchen - baseline, all_correct on novel compositions (points): {comparison.headline()}")
    info = {"pipeline": pipe_info["weights"], "trained": trained, "resolution": res, "n_prompts": len(prompts),
            "groups": {g: int(m.sum()) for g, m in groups.items()}, "seen_from": seen_note,
            "judge": judge_name, "probe": dataclasses.asdict(cfg), "inception": bool(inception),
            "headline_quality": "KID_tiny (FID_tiny is only comparable between sets of equal size)",
            # the paper's own figure recomputed: 24,602 A100 hours at `watts` and its 0.37 kg/kWh (250 W: 2,276 kg)
            "carbon_check_kg": carbon_kg(24_602, p.watts, 0.37), "seconds": time.time() - t0}
    if paired:  # only then does the noise differ from the one stream per generator of a run without a baseline
        info["sampling_noise"] = "per prompt: prompt i of every sampled system drawn from the seed (seed, i)"
    return EvaluationResult(prompts, images, estimates, ceiling, tables, info, costs, claims, baseline_info,
                            comparison, curve)


ABLATIONS = ((SEMANTICS, "10_compression"), (STABILITY, "09_objective"), (P2_WEIGHTING, "09_objective"))


def stated_claims() -> list[Claim]:
    """Every claim with its rule as stated before any measurement: 07's own and the ablation notebooks'."""
    ablations = {c.name: c for c, _ in ABLATIONS}
    return [ablations.get(c.name, c) for c in _stated_here()]


def ablation_claims(profile: str) -> list[Claim]:
    """The claims that the ablation notebooks measure, from their latest runs, each judged by the rule its study
    module states."""
    return [claim_from_run(claim, notebook, latest_run(notebook, profile)) for claim, notebook in ABLATIONS]


def _mean_seconds(batch_seconds: dict[str, list[float]], names: list[str]) -> list[float]:
    """Per batch, the mean seconds over ``names`` (the seeds of one system: the same network, other weights)."""
    names = list(dict.fromkeys(names))
    return [sum(batch_seconds[n][i] for n in names) / len(names) for i in range(len(batch_seconds[names[0]]))]


def _claim_detail(detail: dict[str, Any], seed: int) -> str:
    """The 08 run behind the first claim's measurement, in words."""
    ratio = detail["budget_ratio"]
    spent = f" (baseline FLOPs {ratio:.3g} x the budget)" if isinstance(ratio, (int, float)) else ""
    extra = f", Würstchen's extra Stage C seeds {detail['stage_c_seeds']}" if detail.get("stage_c_seeds") else ""
    return (f"{detail['run']}, budget {detail['budget']}{spent}, seeds {detail['seeds']}{extra}, {detail['n_prompts']} "
            f"held-out prompts of novel compositions (never trained on), sampling seed {seed}")


def _quality_keys(estimates: dict[str, dict[str, Estimate]], ceiling: dict[str, Estimate]) -> list[str]:
    # KID before FID: KID is the headline, FID is only comparable between sets of equal size
    keys = [k for k in next(iter(estimates.values())) if k not in ceiling]
    return sorted(keys, key=lambda k: (not k.startswith("KID"), keys.index(k)))


def _estimates_table(estimates: dict[str, dict[str, Estimate]], columns: list[str]) -> pd.DataFrame:
    """Rows = models, cells ``value [low, high]`` (95% bootstrap CI)."""
    df = pd.DataFrame({name: {c: str(est[c]) for c in columns if c in est} for name, est in estimates.items()}).T
    df.index.name = "model"
    return df


def samples_figure(result: EvaluationResult, n: int = 8):
    """One row of samples per generator on the first ``n`` prompts."""
    names = list(result.images)
    k = min(n, len(result.prompts))
    titles = [m.replace(" (", "\n(").replace(", ", ",\n") for m in names]  # row labels fit the image height
    return image_grid([result.images[m][:k] for m in names], titles, result.prompts[:k])


def compositional_figure(result: EvaluationResult):
    """Per-attribute accuracy with 95% CIs for every generator, next to the probe's ceiling."""
    groups = {"probe ceiling": result.probe_ceiling, **{n: e for n, e in result.estimates.items()}}
    attrs = list(result.probe_ceiling)
    fig, ax = plt.subplots(figsize=(1.2 * len(attrs) + 2, 3.2))
    width = 0.8 / len(groups)
    x = np.arange(len(attrs))
    for i, (name, est) in enumerate(groups.items()):
        vals = np.array([est[a].value for a in attrs])
        err = np.array([[est[a].value - est[a].low for a in attrs], [est[a].high - est[a].value for a in attrs]])
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, vals, width, yerr=np.clip(err, 0, None), label=name,
               capsize=2)
    ax.set_xticks(x, attrs, rotation=20)
    ax.set_ylabel("% of images correct")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_outputs(result: EvaluationResult, run: Run) -> dict[str, Path]:
    """Tables (markdown + CSV, copied into ``reports/`` by ``wurst_core.workbench.report``) and metrics into the run folder."""
    written = {name: run.save_table(name, df, index=True) for name, df in result.tables.items()}
    if result.claims:  # the claims table: the report puts it at the top of reports/index.md
        written["claims"] = run.save_table("claims", claims_table(result.claims))
    run.save_metrics(result.metrics())
    return written
