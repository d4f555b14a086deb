"""Notebook 01: the tiny CLIP trained contrastively (twins, token-wise term); its parameter schema."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..params import PROFILES, choice, param
from ..text import CLIP_TRAINING, ClipTraining


@dataclass(frozen=True)
class TextEncoderParams:
    """Parameters of notebooks/01_text_encoder.ipynb (0 / -1: the profile's value in ``CLIP_TRAINING``)."""

    profile: str = choice("tiny", *PROFILES)
    seed: int = param(0, ge=0)
    steps: int = param(0, ge=1)
    batch_size: int = param(0, ge=2)        # a contrastive batch needs negatives
    lr: float = param(0.0, gt=0, le=1)
    pool: int = param(0, ge=1)
    eval_size: int = param(0, ge=2)
    install: bool = True  # also save as the profile's shared text encoder (used by Stages B and C)
    twins: float = param(-1.0, ge=0, le=0.5, unset=-1.0)  # fraction of each batch that are hard-negative twins
    filip: float = param(-1.0, ge=0, unset=-1.0)          # weight of the token-wise (FILIP) term; 0: plain CLIP

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        t = CLIP_TRAINING[profile]
        return {"steps": t.steps, "batch_size": t.batch_size, "lr": t.lr, "pool": t.pool, "eval_size": t.eval_size,
                "twins": t.twins, "filip": t.filip}

    def training(self) -> ClipTraining:
        return dataclasses.replace(CLIP_TRAINING[self.profile], steps=self.steps, batch_size=self.batch_size,
                                   lr=self.lr, pool=self.pool, eval_size=self.eval_size, twins=self.twins,
                                   filip=self.filip)
