"""Evaluation: the paper's metrics and tables without downloads, and exact compositional accuracy.

One module per topic:

* ``stats``: :class:`Estimate`, :func:`bootstrap`, :func:`mean_ci` (fixed-seed bootstrap CIs for every metric).
* ``probe``: :class:`AttributeProbe` trained on real images (:func:`train_probe`) and
  :func:`compositional_accuracy` (per attribute and all-correct, against the prompt's ground truth).
* ``image_metrics``: FID / KID / IS through torchmetrics on features of :class:`ProbeExtractor` (FID_tiny, ...)
  or :class:`InceptionExtractor` (the standard InceptionV3 from a local weights file).
* ``preference``: :class:`ClipJudge` (open_clip or transformers CLIP), :func:`clip_score`, the PickScore
  procedure (:func:`pick_scores`, :func:`preference_probs`, :func:`win_rate`), :func:`load_pickscore`.
* ``prompts``: COCO captions, Localized Narratives and PartiPrompts loaders for local files.
* ``sensitivity``: :func:`caption_sensitivity` (which caption attributes a trained prior reads: its loss with
  counterfactual captions, :func:`counterfactual_captions`).
* ``tables``: :func:`table1`, :func:`table2`, :func:`carbon_kg`, :data:`PAPER_TABLE2`.
* ``generators``: ``prompts -> images`` callables, per-prompt seeds (:func:`per_prompt_generator`), reference rows.
* ``pixels``: PSNR and SSIM; ``text_layout``: the probe of what layout text tokens carry.
* ``compute``: FLOPs per training step / forward pass (:func:`training_flops`, :func:`forward_flops`) and CPU
  :func:`core_hours` -> :func:`energy_kwh` -> kg CO2eq (``carbon_kg_from_kwh``; not the GPU-hours ``carbon_kg``).
* ``stats`` also: :func:`paired_difference`, :func:`pooled_over_seeds`, :func:`pooled_paired_difference`.
* ``claims``: :class:`Claim` with a decision rule stated up front (or not measured yet), :func:`verdict`,
  :func:`claims_table`.
* ``oracle``: the oracle judge from attribute checks (:func:`oracle_outcomes`) and :func:`judge_agreement`.

The notebook's evaluation study is ``wurst_core.studies.evaluation``.
"""
from __future__ import annotations

from .claims import INCONCLUSIVE, NOT_MEASURED, REFUTED, SUPPORTED, Claim, Verdict, claims_table, verdict
from .compute import StepFlops, core_hours, energy_kwh, forward_flops, step_flops, training_flops
from .compute import carbon_kg as carbon_kg_from_kwh
from .generators import (Generator, generate, lookup_generator, noise_generator, per_prompt_generator,
                         pipeline_generator, prompt_generators, shuffled_generator)
from .image_metrics import (FID_SIZE, IS_SIZE, FeatureSet, InceptionExtractor, ProbeExtractor, extract, fid,
                            image_quality, inception_score, kid)
from .oracle import attribute_scores, judge_agreement, oracle_outcomes, oracle_scene_outcomes, pairwise_agreement
from .preference import (ClipJudge, clip_preprocess, clip_score, load_pickscore, pairwise_outcomes, pick_scores,
                         preference_probs, win_rate)
from .probe import (PROBE_SIZES, AttributeProbe, CompositionalResult, ProbeConfig, ProbeSpec, ProbeTraining,
                    chance_truths, compositional_accuracy, scene_checks, train_probe)
from .prompts import load_coco_captions, load_localized_narratives, load_parti_prompts
from .sensitivity import caption_sensitivity, counterfactual_captions
from .stats import (Estimate, bootstrap, mean_ci, paired_difference, pooled_over_seeds,
                    pooled_paired_difference)
from .tables import PAPER_TABLE2, Table2Row, carbon_kg, table1, table2

__all__ = [
    "Generator", "generate", "lookup_generator", "noise_generator", "pipeline_generator", "shuffled_generator",
    "per_prompt_generator", "prompt_generators",
    "FID_SIZE", "IS_SIZE", "FeatureSet", "InceptionExtractor", "ProbeExtractor", "extract", "fid", "image_quality",
    "inception_score", "kid",
    "ClipJudge", "clip_preprocess", "clip_score", "load_pickscore", "pairwise_outcomes", "pick_scores",
    "preference_probs", "win_rate",
    "PROBE_SIZES", "AttributeProbe", "CompositionalResult", "ProbeConfig", "ProbeSpec", "ProbeTraining",
    "chance_truths", "compositional_accuracy", "scene_checks", "train_probe",
    "load_coco_captions", "load_localized_narratives", "load_parti_prompts",
    "Estimate", "bootstrap", "mean_ci", "caption_sensitivity", "counterfactual_captions",
    "PAPER_TABLE2", "Table2Row", "carbon_kg", "table1", "table2",
    "StepFlops", "step_flops", "training_flops", "forward_flops", "core_hours", "energy_kwh", "carbon_kg_from_kwh",
    "paired_difference", "pooled_over_seeds", "pooled_paired_difference",
    "Claim", "Verdict", "SUPPORTED", "REFUTED", "INCONCLUSIVE", "NOT_MEASURED", "verdict", "claims_table",
    "attribute_scores", "oracle_outcomes", "oracle_scene_outcomes", "pairwise_agreement", "judge_agreement",
]
