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


def start_run(notebook: str, profile: str, config: Any = None, run_id: str | None = None, resume: bool = False) -> Run:
    """Create the run folder and write the resolved ``config.json``.

    ``resume=True`` re-uses the most recent folder of this notebook and profile (finished or killed), so that
    training continues from the checkpoints it holds.
    """
    if resume and run_id is None:
        base = paths.runs_dir() / notebook / profile
        previous = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []
        run_id = previous[-1] if previous else None
    run_id = run_id or new_run_id()
    d = paths.runs_dir() / notebook / profile / run_id
    d.mkdir(parents=True, exist_ok=True)
    run = Run(notebook=notebook, profile=profile, run_id=run_id, dir=d)
    if config is not None:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        write_json(d / "config.json", cfg)
    run.logger.info("run started: %s", d)
    return run


def latest_run(notebook: str, profile: str) -> Run | None:
    """The most recent run of a notebook on a profile that wrote ``metrics.json``, or None."""
    base = paths.runs_dir() / notebook / profile
    if not base.exists():
        return None
    done = sorted((p for p in base.iterdir() if (p / "metrics.json").exists()), key=lambda p: p.name)
    if not done:
        return None
    return Run(notebook=notebook, profile=profile, run_id=done[-1].name, dir=done[-1])
