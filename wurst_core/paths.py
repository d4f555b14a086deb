"""Absolute paths of the workbench, so that papermill (caller's cwd) and nbval (notebook's cwd) agree.

Environment overrides: ``WURST_RUNS_DIR`` (where runs are written; tests point it at a temporary folder)
and ``WURST_REPORTS_DIR`` (where ``reports/index.md`` is built).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
NOTEBOOKS: Path = REPO_ROOT / "notebooks"
CONFIGS: Path = REPO_ROOT / "configs"


def reports_dir() -> Path:
    return Path(os.environ.get("WURST_REPORTS_DIR", REPO_ROOT / "reports")).resolve()


def runs_dir() -> Path:
    return Path(os.environ.get("WURST_RUNS_DIR", reports_dir() / "runs")).resolve()


def cache_dir() -> Path:
    """Artifacts shared between notebooks of one profile (e.g. the trained tiny CLIP used by Stage B/C)."""
    return Path(os.environ.get("WURST_CACHE_DIR", runs_dir() / "_shared")).resolve()
