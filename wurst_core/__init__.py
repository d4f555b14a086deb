"""wurst_core: the Würstchen workbench (arXiv 2306.00637).

Public surface (imported lazily so that ``import wurst_core`` stays fast):
``load_model``, ``Pipeline``, the stage networks and their configs, and the submodules
``data``, ``text``, ``diffusion``, ``samplers``, ``train``, ``evaluate``, ``report``, ``notebook``, ``runs``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("wurst_core.weights", "load_model"),
    "save_model": ("wurst_core.weights", "save_model"),
    "export_diffusers": ("wurst_core.weights", "export_diffusers"),
    "Pipeline": ("wurst_core.pipeline", "Pipeline"),
    "StageA": ("wurst_core.models.stage_a", "StageA"),
    "StageB": ("wurst_core.models.stage_b", "StageB"),
    "StageC": ("wurst_core.models.stage_c", "StageC"),
    "SemanticCompressor": ("wurst_core.models.semantic", "SemanticCompressor"),
}
_SUBMODULES = {"data", "text", "diffusion", "samplers", "train", "evaluate", "report", "notebook", "runs",
               "paths", "io", "models", "weights", "pipeline", "cli"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"wurst_core.{name}")
    raise AttributeError(f"module 'wurst_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
