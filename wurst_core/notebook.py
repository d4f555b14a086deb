"""The notebook parameter contract.

Every notebook has three leading cells::

    import wurst_core as wc                    # imports
    _before = set(globals())                   # snapshot: names that are not parameters

    profile: str = "tiny"  # smoke | tiny | paper     <- the one cell tagged `parameters`
    steps: int = 0         # 0: the profile's value

    cfg = wc.notebook.resolve(StageAParams, globals(), _before)   # frozen config; raises on bad input

papermill only *warns* about unknown parameters and does not recompute derived values, so ``resolve``
raises on any name defined by the parameters or injected cell that the schema lacks, validates types
and choices, and fills the values left at their "profile default" sentinel (``0``, ``""`` or ``None``)
from the schema's profile table.

Profile selection: "Run All" in JupyterLab runs the committed default (``tiny``). The environment variable
``WURST_PROFILE`` overrides the *default* profile; CI sets ``WURST_PROFILE=smoke`` for nbval, which runs
notebooks as committed. A profile passed explicitly through papermill (``-p profile tiny``) is applied after
the parameters cell, and ``WURST_PROFILE`` then does not override it only when it differs from the default.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping, TypeVar

PROFILES = ("smoke", "tiny", "paper")
T = TypeVar("T")


class ParameterError(ValueError):
    """An unknown or invalid notebook parameter."""


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0) or value == ""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
            raise ParameterError(f"parameter {name!r} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


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


def build(schema: type[T], values: Mapping[str, Any]) -> T:
    """Validate ``values`` against ``schema`` and fill unset ones from ``schema.profile_defaults(profile)``."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown}; this notebook takes {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    values = dict(values)
    if "profile" in fields:
        default = fields["profile"].default
        profile = values.get("profile", default)
        env = os.environ.get("WURST_PROFILE")
        if env and profile == default:
            profile = env
        if profile not in PROFILES:
            raise ParameterError(f"profile must be one of {PROFILES}, got {profile!r}")
        values["profile"] = profile
        table = schema.profile_defaults(profile) if hasattr(schema, "profile_defaults") else {}
        bad = sorted(set(table) - set(fields))
        if bad:
            raise ParameterError(f"profile table names unknown fields {bad}")
        for k, v in table.items():
            current = values.get(k, fields[k].default)
            # an optional field (``float | None``) is unset only when None: its 0 is a value (e.g. no guidance)
            if current is None if type(None) in typing.get_args(hints[k]) else _is_unset(current):
                values[k] = v
    for k, v in list(values.items()):
        values[k] = _check_type(k, v, hints[k])
        choices = fields[k].metadata.get("choices")
        if choices is not None and values[k] not in choices:
            raise ParameterError(f"parameter {k!r} must be one of {list(choices)}, got {values[k]!r}")
    return schema(**values)


def choice(default: Any, *choices: Any) -> Any:
    """A dataclass field restricted to ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})
