"""The workbench's notebooks in run order: each one's title and the parameter schema its resolving cell builds.

Training runs in reverse order of sampling (paper Fig. 3): Stage A, then B with the compressor, then C. The run order
is this registry's order, not the files' numbers: ``08_baseline`` and the two ablations (09, 10) run before
``07_evaluation`` (00-06, 08, 09, 10, 07, then 11-14), because 07 evaluates the baseline that 08 trains and reads the
ablations' claims into the claims table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import paths
from ..studies.architecture import ArchitectureParams
from ..studies.baseline import BaselineParams
from ..studies.compression import CompressionParams
from ..studies.data import DataParams
from ..studies.evaluation import EvaluationParams
from ..studies.explorer import ExplorerParams
from ..studies.finetune import FinetuneParams
from ..studies.objective import ObjectiveParams
from ..studies.preference_study import PreferenceParams
from ..studies.previewer import PreviewerParams
from ..studies.sampling import SamplingParams
from ..studies.stage_a import StageAParams
from ..studies.stage_b import StageBParams
from ..studies.stage_c import StageCParams
from ..studies.text_encoder import TextEncoderParams


@dataclass(frozen=True)
class Entry:
    title: str
    schema: type[Any]


NOTEBOOKS: dict[str, Entry] = {
    "00_data": Entry("Data: procedural, emoji and folder datasets", DataParams),
    "01_text_encoder": Entry("Text encoder: tiny CLIP trained contrastively", TextEncoderParams),
    "02_architecture": Entry("Architecture: parameters, FLOPs, latent shapes", ArchitectureParams),
    "03_stage_a": Entry("Stage A: f4 VQGAN", StageAParams),
    "04_stage_b": Entry("Stage B: latent decoder with the Semantic Compressor", StageBParams),
    "05_stage_c": Entry("Stage C: text-conditional prior (42:1 released; 16:1 on tiny)", StageCParams),
    "06_sampling": Entry("Sampling: the three-stage pipeline", SamplingParams),
    "08_baseline": Entry("Baseline: a U-Net LDM at Stage C's training FLOPs", BaselineParams),  # before 07: 07 reads it
    "09_objective": Entry("Ablation: the training objective (A/B, eps, v; p2 or constant weighting)", ObjectiveParams),
    "10_compression": Entry("Ablation: the compression ratio of Stage C's latent", CompressionParams),
    "07_evaluation": Entry("Evaluation: FID, IS, CLIP score, PickScore-style preference, compositional accuracy",
                           EvaluationParams),
    "11_preference": Entry("Human preference study (Figure 5), simulated by default", PreferenceParams),
    "12_finetune": Entry("Fine-tuning Stage C on your images: LoRA and full", FinetuneParams),
    "13_previewer": Entry("Previewer: Stage C's latents as images while it samples", PreviewerParams),
    "14_explorer": Entry("Explorer: interactive sampling in JupyterLab", ExplorerParams),  # after 12, 13: loads both
}


def notebooks() -> list[str]:
    """The workbench's notebooks in run order (those present on disk)."""
    present = {p.stem for p in paths.NOTEBOOKS.glob("*.ipynb")}
    ordered = [n for n in NOTEBOOKS if n in present]
    return ordered + sorted(present - set(ordered))


def schema(name: str) -> type[Any]:
    """The parameter schema of a notebook; a clear error for an unknown one."""
    if name not in NOTEBOOKS:
        raise ValueError(f"no notebook {name!r}; available: {notebooks()}")
    return NOTEBOOKS[name].schema
