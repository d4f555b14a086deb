"""Measured compute: FLOPs per training step or forward pass (FlopCounterMode); CPU core-hours -> kWh -> kg CO2eq."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, split into the forward pass and the backward pass."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _counted(fn: Callable[[], object]) -> tuple[int, object]:
    # display=False: a measurement, not a printout; the counter sees every aten op dispatched inside fn
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


def step_flops(step_fn: Callable[[], Tensor]) -> StepFlops:
    """Count one training step: ``step_fn()`` runs the forward pass and returns the scalar loss, which is then
    back-propagated under a second counter. Gradients accumulate into ``.grad`` as in a real step.

    FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add), not elementwise ops.
    """
    forward, loss = _counted(step_fn)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("step_fn must return a scalar loss tensor that requires grad")
    backward, _ = _counted(loss.backward)
    return StepFlops(forward, backward)


def training_flops(step_fn: Callable[[], Tensor]) -> int:
    """FLOPs of one training step (forward + backward) of ``step_fn`` (see :func:`step_flops`)."""
    return step_flops(step_fn).total


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of an inference call ``fn()``, run under ``torch.no_grad()`` (no graph, no backward)."""
    with torch.no_grad():
        flops, _ = _counted(fn)
    return flops


def _check(**values: float) -> None:
    # every unit conversion takes non-negative finite numbers; a NaN would pass silently into a table
    bad = {k: v for k, v in values.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"need finite values >= 0, got {bad}")


def core_hours(seconds: float, cores: int) -> float:
    """CPU core-hours of a run: wall-clock seconds x cores in use / 3600 (CPU cores, not GPU hours)."""
    _check(seconds=seconds, cores=cores)
    return seconds * cores / 3600.0


def energy_kwh(core_hours: float, watts_per_core: float) -> float:
    """Energy in kWh of ``core_hours`` at ``watts_per_core`` (e.g. a CPU package's TDP / its core count)."""
    _check(core_hours=core_hours, watts_per_core=watts_per_core)
    return core_hours * watts_per_core / 1000.0


def carbon_kg(kwh: float, kg_per_kwh: float) -> float:
    """Emissions in kg CO2eq of ``kwh`` at a grid intensity of ``kg_per_kwh``, unrounded.

    Not the package-level ``evaluation.carbon_kg`` (tables.py: the paper's GPU-hours formula with the ML CO2
    calculator's rounding); exported there as ``carbon_kg_from_kwh``.
    """
    _check(kwh=kwh, kg_per_kwh=kg_per_kwh)
    return kwh * kg_per_kwh
