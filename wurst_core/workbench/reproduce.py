"""The main job: run every notebook through papermill on one profile, then rebuild ``reports/index.md``."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable

from .. import paths
from ..io import write_json
from ..params import PROFILES, ParameterError, build
from ..runs import ResumeError, new_run_id, refuse_changed_config, resumable_run_id
from .registry import NOTEBOOKS, notebooks, schema
from .report import build_report

NOTEBOOK_ORDER: tuple[str, ...] = tuple(NOTEBOOKS)
DONE = "done.json"  # written into a run folder when its notebook ran to the end


def notebook_parameters(name: str) -> dict[str, dict[str, Any]]:
    """papermill's view of a notebook's parameters cell (name -> default, type, help)."""
    import papermill as pm

    return pm.inspect_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"))


def check_parameters(name: str, profile: str, parameters: dict[str, Any]) -> Any:
    """The notebook's resolved configuration for these parameters: every name, type, choice and domain checked
    against the notebook's own schema (not papermill's parse of its cell), before anything is written."""
    if name not in notebooks():
        raise ParameterError(f"no notebook {name!r}; available: {notebooks()}")
    if profile not in PROFILES:
        raise ParameterError(f"profile must be one of {PROFILES}, got {profile!r}")
    fields = {f.name for f in dataclasses.fields(schema(name))}
    unknown = sorted(set(parameters) - fields)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown} for {name}; it takes {sorted(fields)}")
    return build(schema(name), {**parameters, "profile": profile})


def _resume_folder(name: str, profile: str, config: Any, run_id: str | None) -> str:
    """The run folder a resumed notebook continues, refusing other hyper-parameters before anything runs."""
    run_id = run_id or resumable_run_id(name, profile)
    refuse_changed_config(paths.runs_dir() / name / profile / run_id, dataclasses.asdict(config))
    return run_id


def run_notebook(name: str, profile: str = "tiny", parameters: dict[str, Any] | None = None,
                 run_id: str | None = None, timeout: int | None = None, progress: bool = True) -> Path:
    """Execute one notebook with papermill into its run folder; returns the executed notebook's path.

    Bad parameters raise before anything runs or is written (papermill alone only warns). ``resume=True``
    continues the newest run folder of the notebook (the one a kill interrupted) instead of starting a new one.
    """
    import papermill as pm

    values = {**(parameters or {}), "profile": profile}
    config = check_parameters(name, profile, values)
    if getattr(config, "resume", False):
        run_id = _resume_folder(name, profile, config, run_id)
        print(f"[wurst] resuming {name} in {paths.runs_dir() / name / profile / run_id}", flush=True)
    run_id = run_id or new_run_id()
    out_dir = paths.runs_dir() / name / profile / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE).unlink(missing_ok=True)
    out = out_dir / "executed.ipynb"
    t0 = time.time()
    old = os.environ.get("WURST_RUN_ID")
    os.environ["WURST_RUN_ID"] = run_id  # the kernel inherits it: the notebook writes into the same folder
    try:
        pm.execute_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=values,
                            kernel_name="python3", language="python", cwd=str(paths.REPO_ROOT),
                            progress_bar=progress, execution_timeout=timeout)
    finally:
        if old is None:
            os.environ.pop("WURST_RUN_ID", None)
        else:
            os.environ["WURST_RUN_ID"] = old
    write_json(out_dir / DONE, {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": time.time() - t0})
    return out


def _last_reproduce(profile: str, selected: list[str]) -> str:
    """The run id of the newest reproduce run (the id its notebooks share) to continue."""
    ids = sorted({p.name for n in selected for p in (paths.runs_dir() / n / profile).glob("*") if p.is_dir()})
    if not ids:
        raise ResumeError(f"nothing to resume: no earlier {profile!r} run of {selected}")
    return ids[-1]


def reproduce(profile: str = "tiny", only: Iterable[str] | None = None, progress: bool = True,
              resume: bool = False) -> dict[str, float]:
    """Run the notebooks in order on ``profile`` and rebuild the report; returns wall seconds per notebook.

    ``resume=True`` continues the newest reproduce run: notebooks that finished there are skipped, the training
    notebooks continue from their last checkpoint, the others run again in the same folder.
    """
    selected = list(only) if only else notebooks()
    for name in selected:
        check_parameters(name, profile, {})
    run_id = _last_reproduce(profile, selected) if resume else new_run_id()
    times: dict[str, float] = {}
    for name in selected:
        folder = paths.runs_dir() / name / profile / run_id
        if resume and (folder / DONE).exists():
            print(f"[wurst reproduce] {name} finished in {folder}; skipped", flush=True)
            continue
        params = {"resume": True} if resume and folder.exists() and "resume" in {
            f.name for f in dataclasses.fields(schema(name))} else {}
        t0 = time.time()
        print(f"[wurst reproduce] {name} ({profile}){' resuming' if params else ''} ...", flush=True)
        run_notebook(name, profile, params, run_id=run_id, progress=progress)
        times[name] = time.time() - t0
        print(f"[wurst reproduce] {name} done in {times[name]:.1f} s", flush=True)
    build_report(profile)
    return times
