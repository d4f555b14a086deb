"""Resume that resumes: through `wurst run` after a SIGKILL, refused with other hyper-parameters, and training that
stops on a finite blow-up as well as on NaN."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from wurst_core import runs
from wurst_core import training as train
from wurst_core.workbench import reproduce
from wurst_core.studies.stage_a import StageAParams
from wurst_core.runs import ResumeError

ROOT = Path(__file__).resolve().parents[1]
STEPS = "400"  # smoke Stage A: ~20 ms a step, a checkpoint every 100 steps: time to kill between two


def _wurst(env: dict[str, str], *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wurst_core", "run", "03_stage_a", "--profile", "smoke",
                             "-p", "steps", STEPS, "-p", "workers", "1", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "checkpoints" / "stage_a" / "model.safetensors")


def test_wurst_run_resumes_a_killed_training_to_the_uninterrupted_weights(tmp_path):
    env = {**os.environ, "WURST_RUNS_DIR": str(tmp_path), "WURST_REPORTS_DIR": str(tmp_path / "reports"),
           "OMP_NUM_THREADS": "1", "WURST_RUN_ID": "1-killed"}
    env.pop("WURST_PROFILE", None)
    killed = tmp_path / "03_stage_a" / "smoke" / "1-killed"
    state = killed / "checkpoints" / "train_a" / "train_state.pt"
    proc = _wurst(env)
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, its kernel and any worker: as a killed job
    proc.wait()
    step = train.load_training_state(state)["step"]
    assert 0 < step < int(STEPS), "the kill must land between the first checkpoint and the end"
    assert not (killed / "checkpoints" / "stage_a").exists()

    env.pop("WURST_RUN_ID")
    out, _ = _wurst(env, "-p", "resume", "True").communicate(timeout=300)
    assert "resuming 03_stage_a in" in out and str(killed) in out, out
    assert sorted(p.name for p in killed.parent.iterdir()) == ["1-killed"], "resume made a new run folder"
    log = (killed / "log.txt").read_text()
    assert f"resuming {killed} from step {step} of {STEPS}" in log

    straight = _wurst({**env, "WURST_RUN_ID": "2-straight"})
    straight.communicate(timeout=300)
    a, b = _weights(killed), _weights(tmp_path / "03_stage_a" / "smoke" / "2-straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_hyper_parameters_is_refused_and_keeps_the_recorded_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WURST_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("WURST_RUN_ID", raising=False)
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    first = reproduce.check_parameters("03_stage_a", "smoke", {"steps": 10})
    run = runs.start_run("03_stage_a", "smoke", first, run_id="1")
    recorded = (run.dir / "config.json").read_text()
    for changed in ({"lr": 0.5}, {"batch_size": 4}, {"steps": 5}):
        params = {"steps": 10, **changed, "resume": True}
        with pytest.raises(ResumeError, match=rf"cannot resume .*{next(iter(changed))}: "):
            reproduce.run_notebook("03_stage_a", "smoke", params)  # refused before the notebook starts
        with pytest.raises(ResumeError, match="other hyper-parameters"):
            runs.start_run("03_stage_a", "smoke", reproduce.check_parameters("03_stage_a", "smoke", params),
                           resume=True)
    assert not (run.dir / "executed.ipynb").exists()
    grown = reproduce.check_parameters("03_stage_a", "smoke", {"steps": 20, "resume": True, "workers": 2})
    assert runs.start_run("03_stage_a", "smoke", grown, resume=True).dir == run.dir  # only more steps: allowed
    assert (run.dir / "config.json").read_text() == recorded, "the recorded configuration was rewritten"
    with pytest.raises(ResumeError, match="nothing to resume"):
        runs.start_run("04_stage_b", "smoke", None, resume=True)


class Blowup(nn.Module):
    """A task whose loss is finite but grows a thousandfold from ``at`` on."""

    def __init__(self, at: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.at, self.calls = at, 0

    def forward(self, batch, gens):
        self.calls += 1
        scale = 1000.0 if self.calls > self.at else 1.0
        return (self.w ** 2).sum() * scale, {}


def _cfg(**kw) -> train.TrainConfig:
    return train.TrainConfig(**{**dict(steps=40, batch_size=2, lr=1e-3, warmup_steps=0, ema_start=0, ema_every=1,
                                       ckpt_every=5, log_every=1, seed=0), **kw})


def test_a_finite_blow_up_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(train.TrainingDiverged, match=r"diverged at step (2[1-9]|3\d).*diverge_factor.*"
                                                     r"Last good checkpoint: step (20|25|30|35)"):
        train.fit(Blowup(at=20), _cfg(), lambda idx: {}, 8, tmp_path, progress=False)
    state = train.load_training_state(tmp_path / "train_state.pt")
    assert state["step"] <= 35 and torch.isfinite(state["model"]["w"]).all()
    # the threshold is a parameter: 1e5 lets the same run finish; 0 turns the guard off
    train.fit(Blowup(at=20), _cfg(diverge_factor=1e5), lambda idx: {}, 8, tmp_path / "lenient", progress=False)
    train.fit(Blowup(at=20), _cfg(diverge_factor=0), lambda idx: {}, 8, tmp_path / "off", progress=False)
    with pytest.raises(ValueError, match="diverge_factor must be > 1"):
        _cfg(diverge_factor=0.5)
    assert StageAParams().diverge_factor == 100.0 and "diverge_factor" in str(StageAParams.__dataclass_fields__)


def test_fit_refuses_to_resume_a_checkpoint_with_other_hyper_parameters(tmp_path):
    train.fit(Blowup(at=10**9), _cfg(steps=10), lambda idx: {}, 8, tmp_path, progress=False)
    with pytest.raises(train.ResumeMismatch, match=r"lr: 0\.001 -> 0\.01"):
        train.fit(Blowup(at=10**9), _cfg(steps=20, lr=1e-2), lambda idx: {}, 8, tmp_path, resume=True,
                  progress=False)
    with pytest.raises(train.ResumeMismatch, match="only a larger step count"):
        train.fit(Blowup(at=10**9), _cfg(steps=5), lambda idx: {}, 8, tmp_path, resume=True, progress=False)
    history = train.fit(Blowup(at=10**9), _cfg(steps=20), lambda idx: {}, 8, tmp_path, resume=True, progress=False)
    assert history["step"].tolist() == list(range(1, 21))


class Pickled:
    """Any class: unpickling it would run code of the file's choosing."""


def test_training_checkpoint_with_pickled_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "train_state.pt"
    torch.save({"step": 1, "payload": Pickled()}, path)
    with pytest.raises(ValueError, match="refused for safety") as err:
        train.load_training_state(path)
    assert "weights_only" not in str(err.value)


def test_reproduce_resume_skips_finished_notebooks_and_resumes_the_interrupted_one(tmp_path, monkeypatch):
    monkeypatch.setenv("WURST_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    for name in ("00_data", "03_stage_a"):
        (tmp_path / name / "smoke" / "20260101-000000").mkdir(parents=True)
    (tmp_path / "00_data" / "smoke" / "20260101-000000" / reproduce.DONE).write_text("{}")
    calls = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda name, profile, params, run_id, progress: calls.append(
        (name, params, run_id)))
    monkeypatch.setattr(reproduce, "build_report", lambda profile: None)
    reproduce.reproduce("smoke", ["00_data", "03_stage_a", "04_stage_b"], resume=True)
    assert calls == [("03_stage_a", {"resume": True}, "20260101-000000"), ("04_stage_b", {}, "20260101-000000")]
    json.dumps(calls)
