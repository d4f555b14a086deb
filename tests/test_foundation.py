"""The workbench's own contracts: packaging, notebooks, parameters, run folders, atomic checkpoints, report."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from wurst_core import io, paths, runs
from wurst_core import params
from wurst_core.workbench import notebook, report
from wurst_core.workbench.reproduce import NOTEBOOK_ORDER, notebooks, run_notebook

ROOT = paths.REPO_ROOT
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PARAM_LINE = re.compile(r"^(\w+)\s*:\s*([\w\[\]| .]+?)\s*=\s*(.+?)\s+#\s*(\S.*)$")


def _norm(name: str) -> str:
    name = re.split(r"[\[<>=!~ ]", name.strip())[0].lower().replace("_", "-")
    return {"pytorch-cpu": "torch", "pytorch": "torch"}.get(name, name)


def test_pyproject_and_environment_name_the_same_dependencies():
    import tomllib

    pp = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = set(map(_norm, pp["project"]["dependencies"]))
    for extra in pp["project"]["optional-dependencies"].values():
        deps |= {_norm(d) for d in extra if not d.startswith("wurst-core")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_norm(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert conda == deps, f"only in environment.yml: {conda - deps}; only in pyproject: {deps - conda}"
    pip_block = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert any(line.startswith("-e .") for line in pip_block)


def test_every_notebook_is_in_the_ordered_runner():
    assert NOTEBOOKS, "no notebooks"
    assert [p.stem for p in NOTEBOOKS if p.stem not in NOTEBOOK_ORDER] == []
    assert notebooks() == [n for n in NOTEBOOK_ORDER if (ROOT / "notebooks" / f"{n}.ipynb").exists()]
    # the run order is the registry's, not the file numbers': 07 evaluates the baseline that 08 trains
    assert NOTEBOOK_ORDER.index("08_baseline") < NOTEBOOK_ORDER.index("07_evaluation")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_clean_with_one_parameters_cell(path: Path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    assert sum("parameters" in t for t in tags) == 1
    assert not any("injected-parameters" in t for t in tags)
    for c in cells:
        if c["cell_type"] == "code":
            assert not c.get("outputs"), f"{path.name} committed with outputs"
            assert c.get("execution_count") is None
    # one typed line per parameter with a help comment, which papermill --help-notebook lists
    pcell = next(c for c, t in zip(cells, tags) if "parameters" in t)
    src = "".join(pcell["source"]).strip().splitlines()
    assert src, "empty parameters cell"
    names = []
    for line in src:
        m = PARAM_LINE.match(line)
        assert m, f"{path.name}: parameter line not of the form `name: type = value  # help`: {line!r}"
        names.append(m.group(1))
    assert "profile" in names
    # the cell after the parameters resolves them into a frozen config
    idx = tags.index(next(t for t in tags if "parameters" in t))
    assert "notebook.resolve(" in "".join(cells[idx + 1]["source"])
    assert "_before = set(globals())" in "".join(cells[idx - 1]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_papermill_lists_every_parameter_with_type_and_help(path: Path):
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    assert "profile" in params
    for name, p in params.items():
        assert p["help"], f"{path.name}: {name} has no help"
        assert p["inferred_type_name"] not in ("None", "Unknown type"), f"{path.name}: {name} untyped"


@dataclass(frozen=True)
class _Schema:
    profile: str = params.choice("tiny", "smoke", "tiny", "paper")
    steps: int = 0
    lr: float = 0.0
    name: str = "x"

    @classmethod
    def profile_defaults(cls, profile: str) -> dict:
        return {"steps": {"smoke": 2, "tiny": 100, "paper": 10_000}[profile], "lr": 1e-3}


def test_resolve_fills_profile_defaults_and_rejects_bad_input(monkeypatch):
    monkeypatch.delenv("WURST_PROFILE", raising=False)
    before = {"wc"}
    cfg = notebook.resolve(_Schema, {"wc": 1, "profile": "tiny", "steps": 0, "lr": 0.0, "name": "x"}, before)
    assert (cfg.steps, cfg.lr) == (100, 1e-3)
    cfg = notebook.resolve(_Schema, {"profile": "smoke", "steps": 7, "lr": 2, "name": "x"}, set())
    assert (cfg.steps, cfg.lr) == (7, 2.0)
    with pytest.raises(params.ParameterError, match="unknown parameter.*stpes"):
        notebook.resolve(_Schema, {"profile": "tiny", "stpes": 5}, set())
    with pytest.raises(params.ParameterError, match="must be int"):
        notebook.resolve(_Schema, {"profile": "tiny", "steps": "many"}, set())
    with pytest.raises(params.ParameterError, match="profile must be one of"):
        notebook.resolve(_Schema, {"profile": "huge"}, set())
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen
    monkeypatch.setenv("WURST_PROFILE", "smoke")
    assert notebook.resolve(_Schema, {"profile": "tiny"}, set()).steps == 2


def test_runner_rejects_unknown_parameters_before_running():
    if not NOTEBOOKS:
        pytest.skip("no notebooks")
    with pytest.raises(params.ParameterError, match="unknown parameter"):
        run_notebook(NOTEBOOKS[0].stem, "smoke", {"definitely_not_a_parameter": 1})
    with pytest.raises(params.ParameterError, match="no notebook"):
        run_notebook("99_missing", "smoke")


def test_run_folder_layout_and_report(tmp_path):
    run = runs.start_run("00_data", "smoke", {"profile": "smoke", "n": 3})
    assert run.dir == paths.runs_dir() / "00_data" / "smoke" / run.run_id
    assert json.loads((run.dir / "config.json").read_text())["n"] == 3
    run.save_metrics({"a": 1.5})
    run.save_metrics({"b": {"c": 2}})
    assert run.metrics()["a"] == 1.5 and run.metrics()["b"]["c"] == 2
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(run.figure("curve"))
    plt.close(fig)
    run.save_table("t", pd.DataFrame({"x": [1, 2]}))
    index = report.build_report("smoke", ["00_data", "03_stage_a"])
    text = index.read_text()
    assert "| a | 1.5 |" in text and "| b.c | 2 |" in text
    assert "figures/00_data/curve.png" in text and (index.parent / "figures/00_data/curve.png").exists()
    assert "No `smoke` run of `notebooks/03_stage_a.ipynb`" in text
    assert runs.latest_run("00_data", "smoke").run_id == run.run_id
    assert ", wall time" not in text  # no runner's done.json: no wall time to show
    assert f"| `00_data` | `{run.run_id}` | - |" in text and "| `03_stage_a` | - | - |" in text
    (run.dir / "done.json").write_text(json.dumps({"finished": "x", "wall_seconds": 125.0}))
    text = report.build_report("smoke", ["00_data", "03_stage_a"]).read_text()
    assert ", wall time 2.1 min)" in text and f"| `00_data` | `{run.run_id}` | 2.1 |" in text
    assert "| **total** | | **2.1** |" in text and "Machine speed" not in text  # smoke: no tiny Stage C to time


def test_report_gives_the_machine_speed_from_stage_cs_training(tmp_path):
    run = runs.start_run("05_stage_c", "tiny", {"profile": "tiny", "batch_size": 32})
    run.save_metrics({"steps": 1000, "train_seconds": 320.0})  # 100 samples/s
    (run.dir / "done.json").write_text(json.dumps({"wall_seconds": 1200.0}))
    assert report.machine_speed("tiny") == pytest.approx(100.0)
    text = "\n".join(report.wall_time_section("tiny", ["05_stage_c"]))
    assert "trained 100 samples/s, against 297" in text and "at that ratio (0.34;" in text


def test_report_opens_with_the_claims_table_of_the_latest_evaluation_run():
    import pandas as pd

    intro = "procedural dataset: its numbers are not comparable with the paper's."
    text = report.build_report("smoke", ["00_data"]).read_text()
    assert "## Claims of the paper\n\n_No claims table yet" in text  # no 07 run: the section says so
    runs.start_run("00_data", "smoke", {"profile": "smoke"}).save_metrics({"a": 1})
    old = runs.start_run("07_evaluation", "smoke", {"profile": "smoke"}, run_id="20260101-000000")
    old.save_metrics({"x": 1})
    old.save_table("claims", pd.DataFrame({"claim": ["old claim"], "verdict": ["refuted"]}))
    run = runs.start_run("07_evaluation", "smoke", {"profile": "smoke"}, run_id="20260102-000000")
    run.save_metrics({"x": 2})
    table = run.save_table("claims", pd.DataFrame({"claim": ["beats the baseline"], "verdict": ["supported"]}))
    text = report.build_report("smoke", ["00_data", "07_evaluation"]).read_text()
    head, rest = text.split("## Claims of the paper\n", 1)
    assert head.rstrip().endswith(intro)  # right after the intro paragraph, before any notebook's section
    section = rest.split("\n## ", 1)[0]
    assert table.read_text().rstrip() in section and "old claim" not in section  # the latest 07 run's, verbatim
    assert "20260102-000000" in section
    assert text.index("## Claims of the paper") < text.index("## Data") < text.index("## Evaluation")


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = {"w": torch.arange(10.0)}
    io.save_model_checkpoint(tmp_path, good, {"stage": "a"})

    import safetensors.torch as st

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise KeyboardInterrupt  # a kill mid-write

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_model_checkpoint(tmp_path, {"w": torch.zeros(10)}, {"stage": "a"})
    monkeypatch.undo()
    assert torch.equal(st.load_file(tmp_path / "model.safetensors")["w"], good["w"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt.pt"
    io.save_torch(target, {"step": 1})
    code = textwrap.dedent(f"""
        import torch, sys
        from wurst_core import io
        big = {{"step": 2, "w": torch.randn(64, 1024, 1024)}}   # 256 MB: slow enough to be killed mid-write
        print("ready", flush=True)
        io.save_torch({str(target)!r}, big)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(target, weights_only=True)["step"] == 1


def test_cli_lists_notebooks():
    out = subprocess.run([sys.executable, "-m", "wurst_core", "notebooks"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for p in NOTEBOOKS:
        assert p.stem in out.stdout


def test_cli_data_preview_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "wurst_core", "data", "preview", "--n", "4", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 64
