"""Typed parameter schemas: frozen dataclasses whose fields declare their domain, filled per profile.

A schema is a frozen dataclass; each field may declare its domain with :func:`param` (an interval, choices, a
comma-separated list) and the class may give ``profile_defaults(profile)``: the values that fields left at their
"profile value" sentinel (``0``, ``""``, ``None``, or a declared ``unset``) take. :func:`build` fills them, then checks
every value's type and domain and the schema's own ``check()`` (rules between fields), raising
:class:`ParameterError` with the parameter's name and its allowed range.

``WURST_PROFILE`` overrides the *default* profile (CI runs the notebooks as committed on ``smoke``); a profile given
explicitly (other than the default) wins.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

PROFILES = ("smoke", "tiny", "paper")
T = TypeVar("T")


class ParameterError(ValueError):
    """An unknown or invalid notebook parameter."""


@dataclass(frozen=True)
class Domain:
    """The allowed interval of a numeric parameter: ``lo <= x <= hi`` (``<`` where open); None is unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        left = "-inf" if self.lo is None else f"{self.lo:g}"
        right = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{left}, {right}{')' if self.hi_open or self.hi is None else ']'}"


def param(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, unset: Any = None, choices: tuple | None = None, items: Domain | None = None,
          item_choices: tuple | None = None) -> Any:
    """A schema field with its declared domain.

    ``ge``/``gt``/``le``/``lt``: the interval a number must lie in (checked after the profile fills it).
    ``unset``: a sentinel meaning "the profile's value" besides the usual 0 / "" / None (e.g. -1 where 0 is a value).
    ``items`` / ``item_choices``: a comma-separated string whose numbers lie in ``items`` or whose names are in
    ``item_choices``.
    """
    meta: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt)):
        meta["domain"] = Domain(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                                lo_open=gt is not None, hi_open=lt is not None)
    if unset is not None:
        meta["unset"] = unset
    if choices is not None:
        meta["choices"] = tuple(choices)
    if items is not None:
        meta["items"] = items
    if item_choices is not None:
        meta["item_choices"] = tuple(item_choices)
    return dataclasses.field(default=default, metadata=meta)


def choice(default: Any, *choices: Any) -> Any:
    """A dataclass field restricted to ``choices``."""
    return param(default, choices=choices)


def listed(text: str) -> list[str]:
    """The names of a comma-separated parameter."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _is_unset(value: Any, field: dataclasses.Field, optional: bool) -> bool:
    if optional:  # an optional field (``float | None``) is unset only when None: its 0 is a value (e.g. no guidance)
        return value is None
    if "unset" in field.metadata:
        return value == field.metadata["unset"] or value is None
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0) or value == ""


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    if _optional(annotation):
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
            raise ParameterError(f"parameter {name!r} must be {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_domain(name: str, value: Any, field: dataclasses.Field) -> None:
    meta = field.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ParameterError(f"parameter {name!r} must be one of {list(choices)}, got {value!r}")
    domain = meta.get("domain")
    if domain is not None and value not in domain:
        raise ParameterError(f"parameter {name!r} must lie in {domain}, got {value!r}")
    if "items" in meta or "item_choices" in meta:
        names = listed(value)
        if not names:
            raise ParameterError(f"parameter {name!r} must list at least one comma-separated value, got {value!r}")
        for item in names:
            if "item_choices" in meta and item not in meta["item_choices"]:
                raise ParameterError(f"parameter {name!r}: {item!r} is not one of {list(meta['item_choices'])}")
            if "items" in meta:
                try:
                    number = float(item)
                except ValueError:
                    raise ParameterError(f"parameter {name!r} must be comma-separated numbers, got {value!r}") from None
                if number not in meta["items"]:
                    raise ParameterError(f"parameter {name!r}: each value must lie in {meta['items']}, got {item}")


def build(schema: type[T], values: Mapping[str, Any]) -> T:
    """Validate ``values`` against ``schema`` and fill unset ones from ``schema.profile_defaults(profile)``.

    Every value is then checked against its field's type, choices and domain, so that a bad value fails here, in the
    notebook's parameter-resolving cell, before a run folder is made.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown}; this notebook takes {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    values = dict(values)
    for k, v in list(values.items()):  # types first: a string where a number belongs must not reach the fill
        values[k] = _check_type(k, v, hints[k])
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
            if _is_unset(values.get(k, fields[k].default), fields[k], _optional(hints[k])):
                values[k] = v
    for k in fields:
        value = _check_type(k, values.get(k, fields[k].default), hints[k])
        _check_domain(k, value, fields[k])
        if k in values:
            values[k] = value
    out = schema(**values)
    check = getattr(out, "check", None)
    if check is not None:  # rules between fields (e.g. a folder dataset needs its folder)
        try:
            check()
        except ParameterError:
            raise
        except ValueError as e:
            raise ParameterError(str(e)) from e
    return out
