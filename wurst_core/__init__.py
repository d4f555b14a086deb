"""wurst_core: the Würstchen workbench (arXiv 2306.00637).

Public surface (imported lazily so that ``import wurst_core`` stays fast): ``load_model``, ``Pipeline``, the stage
networks and the package's floors as submodules (see the README's map; each floor imports only floors below it):
foundation ``io``, ``paths``, ``params``, ``runs``; ``models``, ``diffusion``, ``data``, ``text``; ``training``,
``weights``, ``pipeline``, ``generate``, ``evaluation``; ``studies`` (one per notebook); ``workbench`` (notebook
contract, registry, reproduce, report, CLI; ``notebook`` and ``report`` are short names for two of them).
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
_SUBMODULES = {name: f"wurst_core.{name}" for name in (
    "io", "paths", "params", "runs", "models", "diffusion", "text", "data", "training", "pipeline", "generate",
    "weights", "evaluation", "studies", "workbench")}
# the notebooks' short names for the workbench's contract and report
_SUBMODULES.update(notebook="wurst_core.workbench.notebook", report="wurst_core.workbench.report")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'wurst_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
