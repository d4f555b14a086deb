"""The notebook parameter contract.

Every notebook has three leading cells::

    import wurst_core as wc                    # imports
    _before = set(globals())                   # snapshot: names that are not parameters

    profile: str = "tiny"  # smoke | tiny | paper     <- the one cell tagged `parameters`
    steps: int = 0         # 0: the profile's value

    cfg = wc.notebook.resolve(StageAParams, globals(), _before)   # frozen config; raises on bad input

papermill only *warns* about unknown parameters and does not recompute derived values, so :func:`resolve` raises on
any name defined by the parameters or injected cell that the schema lacks, then builds the schema
(:func:`wurst_core.params.build`: profile values filled, types and domains checked) before any run folder exists.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from ..params import PROFILES, ParameterError, build

T = TypeVar("T")
__all__ = ["PROFILES", "ParameterError", "build", "resolve"]


def resolve(schema: type[T], namespace: Mapping[str, Any], before: set[str] | None = None) -> T:
    """Build the frozen ``schema`` instance from a notebook's globals. See the module docstring."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if before is not None:
        defined = {k for k in namespace if k not in before and not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython")}
        unknown = sorted(defined - set(fields))
        if unknown:
            raise ParameterError(f"unknown parameter(s) {unknown}; this notebook takes {sorted(fields)}")
    values = {k: namespace[k] for k in fields if k in namespace}
    return build(schema, values)
