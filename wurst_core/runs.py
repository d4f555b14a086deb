"""Run folders: ``reports/runs/<notebook>/<profile>/<run_id>/`` with config, metrics, figures, checkpoints, log."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .io import write_json


@dataclass
class Run:
    """One execution of one notebook (or script) on one profile."""

    notebook: str
    profile: str
    run_id: str
    dir: Path

    @property
    def figures(self) -> Path:
        (self.dir / "figures").mkdir(parents=True, exist_ok=True)
        return self.dir / "figures"

    @property
    def checkpoints(self) -> Path:
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self.dir / "checkpoints"

    def figure(self, name: str) -> Path:
        return self.figures / (name if name.endswith((".png", ".svg")) else f"{name}.png")

    def save_metrics(self, metrics: dict[str, Any]) -> Path:
        """Merge ``metrics`` into ``metrics.json`` (written atomically)."""
        path = self.dir / "metrics.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(metrics)
        old.setdefault("_run", {}).update(
            {"notebook": self.notebook, "profile": self.profile, "run_id": self.run_id, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
        return write_json(path, old)

    def save_table(self, name: str, df: Any, index: bool = False) -> Path:
        """Write ``tables/<name>.md`` and ``.csv`` (a pandas DataFrame), which the report picks up."""
        d = self.dir / "tables"
        d.mkdir(parents=True, exist_ok=True)
        df.to_csv(d / f"{name}.csv", index=index)
        (d / f"{name}.md").write_text(df.to_markdown(index=index, floatfmt=".4g") + "\n")
        return d / f"{name}.md"

    def metrics(self) -> dict[str, Any]:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def logger(self) -> logging.Logger:
        log = logging.getLogger(f"wurst.{self.notebook}.{self.run_id}")
        if not log.handlers:
            handler = logging.FileHandler(self.dir / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        return log


def new_run_id() -> str:
    return os.environ.get("WURST_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")


# Settings a resumed run may change: they leave the maths of the finished weights alone (only the step count grows).
RESUMABLE_CHANGES = frozenset({"resume", "steps", "workers", "diverge_factor"})


class ResumeError(ValueError):
    """A run cannot be resumed as asked (none to resume, or other hyper-parameters)."""


def config_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The settings of ``config`` that differ from the ``recorded`` ones in a way a resume may not change."""
    out = [f"{k}: {recorded.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(recorded) | set(config))
           if k not in RESUMABLE_CHANGES and recorded.get(k) != config.get(k)]
    if isinstance(recorded.get("steps"), int) and isinstance(config.get("steps"), int) \
            and config["steps"] < recorded["steps"]:
        out.append(f"steps: {recorded['steps']} -> {config['steps']} (a resumed run may only train longer)")
    return out


def refuse_changed_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Raise :class:`ResumeError` when ``config`` differs from the one ``run_dir`` recorded beyond what a resume may
    change (only ``steps`` may grow)."""
    recorded = run_dir / "config.json"
    if recorded.exists():
        changed = config_differences(json.loads(recorded.read_text()), config)
        if changed:
            raise ResumeError(f"cannot resume {run_dir} with other hyper-parameters ({'; '.join(changed)}); "
                              "start a new run instead (without resume)")


def resumable_run_id(notebook: str, profile: str) -> str:
    """The newest run folder of a notebook on a profile (finished or killed): the one ``resume`` continues."""
    base = paths.runs_dir() / notebook / profile
    previous = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []
    if not previous:
        raise ResumeError(f"nothing to resume: no earlier run of {notebook} on profile {profile!r} in {base}")
    return previous[-1]


def start_run(notebook: str, profile: str, config: Any = None, run_id: str | None = None, resume: bool = False) -> Run:
    """Create the run folder and write the resolved ``config.json``.

    ``resume=True`` re-uses a run folder (``run_id``, else ``WURST_RUN_ID`` as set by the runner, else the newest
    of this notebook and profile), so that training continues from the checkpoints it holds. Its recorded
    ``config.json`` is never rewritten: a resume with other hyper-parameters is refused (only ``steps`` may grow).
    """
    if resume and run_id is None:
        run_id = os.environ.get("WURST_RUN_ID") or resumable_run_id(notebook, profile)
    run_id = run_id or new_run_id()
    d = paths.runs_dir() / notebook / profile / run_id
    cfg = None
    if config is not None:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if resume and (d / "config.json").exists():
        if cfg is not None:
            refuse_changed_config(d, cfg)
        cfg = None  # the folder keeps the configuration its weights were made with
    d.mkdir(parents=True, exist_ok=True)
    run = Run(notebook=notebook, profile=profile, run_id=run_id, dir=d)
    if cfg is not None:
        write_json(d / "config.json", cfg)
    run.logger.info("run %s: %s", "resumed" if resume else "started", d)
    return run


def finished_runs(notebook: str, profile: str) -> list[Run]:
    """Every run of a notebook on a profile that wrote ``metrics.json``, oldest first (run ids sort by time)."""
    base = paths.runs_dir() / notebook / profile
    if not base.exists():
        return []
    done = sorted((p for p in base.iterdir() if (p / "metrics.json").exists()), key=lambda p: p.name)
    return [Run(notebook=notebook, profile=profile, run_id=d.name, dir=d) for d in done]


def latest_run(notebook: str, profile: str) -> Run | None:
    """The most recent run of a notebook on a profile that wrote ``metrics.json``, or None."""
    done = finished_runs(notebook, profile)
    return done[-1] if done else None
