"""Notebook 00: the datasets (procedural, emoji, folder) looked at; its parameter schema."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..params import PROFILES, choice, param


@dataclass(frozen=True)
class DataParams:
    """Parameters of notebooks/00_data.ipynb."""

    profile: str = choice("tiny", *PROFILES)
    resolution: int = param(0, ge=8, le=4096)   # 0: the profile's value
    n_preview: int = param(0, ge=1, le=256)     # items per preview grid
    n_stats: int = param(0, ge=1)               # scenes for the attribute histograms
    seed: int = param(0, ge=0)

    @classmethod
    def profile_defaults(cls, profile: str) -> dict[str, Any]:
        return {"smoke": {"resolution": 64, "n_preview": 8, "n_stats": 200},
                "tiny": {"resolution": 64, "n_preview": 16, "n_stats": 5000},
                "paper": {"resolution": 256, "n_preview": 16, "n_stats": 20000}}[profile]
