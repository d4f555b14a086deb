"""The main job: run every notebook through papermill on one profile, then rebuild ``reports/index.md``."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

from . import paths
from .notebook import PROFILES, ParameterError
from .runs import new_run_id

# Training runs in reverse order of sampling (paper Fig. 3): Stage A, then B with the compressor, then C.
NOTEBOOK_ORDER: tuple[str, ...] = (
    "00_data",
    "01_text_encoder",
    "02_architecture",
    "03_stage_a",
    "04_stage_b",
    "05_stage_c",
    "06_sampling",
    "07_evaluation",
)


def notebooks() -> list[str]:
    """The workbench's notebooks in run order (those present on disk)."""
    present = {p.stem for p in paths.NOTEBOOKS.glob("*.ipynb")}
    ordered = [n for n in NOTEBOOK_ORDER if n in present]
    return ordered + sorted(present - set(ordered))


def notebook_parameters(name: str) -> dict[str, dict[str, Any]]:
    import papermill as pm

    return pm.inspect_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"))


def run_notebook(name: str, profile: str = "tiny", parameters: dict[str, Any] | None = None,
                 run_id: str | None = None, timeout: int | None = None, progress: bool = True) -> Path:
    """Execute one notebook with papermill into its run folder; returns the executed notebook's path.

    Unknown parameters raise before anything runs (papermill alone only warns).
    """
    import papermill as pm

    if name not in notebooks():
        raise ParameterError(f"no notebook {name!r}; available: {notebooks()}")
    if profile not in PROFILES:
        raise ParameterError(f"profile must be one of {PROFILES}, got {profile!r}")
    params = {"profile": profile, **(parameters or {})}
    known = notebook_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown} for {name}; it takes {sorted(known)}")
    run_id = run_id or new_run_id()
    out_dir = paths.runs_dir() / name / profile / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "executed.ipynb"
    old = os.environ.get("WURST_RUN_ID")
    os.environ["WURST_RUN_ID"] = run_id  # the kernel inherits it: the notebook writes into the same folder
    try:
        pm.execute_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=params,
                            kernel_name="python3", language="python", cwd=str(paths.REPO_ROOT),
                            progress_bar=progress, execution_timeout=timeout)
    finally:
        if old is None:
            os.environ.pop("WURST_RUN_ID", None)
        else:
            os.environ["WURST_RUN_ID"] = old
    return out


def reproduce(profile: str = "tiny", only: Iterable[str] | None = None, progress: bool = True) -> dict[str, float]:
    """Run the notebooks in order on ``profile`` and rebuild the report; returns wall seconds per notebook."""
    from .report import build_report

    selected = list(only) if only else notebooks()
    run_id = new_run_id()
    times: dict[str, float] = {}
    for name in selected:
        t0 = time.time()
        print(f"[wurst reproduce] {name} ({profile}) ...", flush=True)
        run_notebook(name, profile, run_id=run_id, progress=progress)
        times[name] = time.time() - t0
        print(f"[wurst reproduce] {name} done in {times[name]:.1f} s", flush=True)
    build_report(profile)
    return times
