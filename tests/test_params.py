"""Every parameter of every notebook is reachable (papermill, `wurst notebooks`, `wurst run`) and every numeric
one has a declared domain that refuses out-of-range values before a run folder exists."""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import typing

import pytest

from wurst_core import paths
from wurst_core import params
from wurst_core.workbench.cli import main
from wurst_core.params import ParameterError
from wurst_core.workbench.registry import NOTEBOOKS, notebooks
from wurst_core.workbench.reproduce import check_parameters, notebook_parameters, run_notebook

NAMES = list(NOTEBOOKS)


def _cell(name: str) -> str:
    nb = json.loads((paths.NOTEBOOKS / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(cell["source"])


def _annotation(tp: typing.Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return f"Optional[{args[0].__name__}]" if type(None) in typing.get_args(tp) else tp.__name__


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_equals_the_schema_and_papermill_parses_every_line(name, caplog):
    schema = NOTEBOOKS[name].schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    with caplog.at_level(logging.WARNING, logger="papermill"):
        parsed = notebook_parameters(name)
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], caplog.text
    assert list(parsed) == list(fields), "papermill lists other names than the schema, or in another order"
    cell = ast.parse(_cell(name))
    for stmt in cell.body:
        assert isinstance(stmt, ast.AnnAssign), ast.unparse(stmt)
        key = stmt.target.id
        assert ast.unparse(stmt.annotation) == _annotation(hints[key]), key
        assert ast.literal_eval(stmt.value) == fields[key].default, f"{key}: cell and schema defaults differ"
        assert parsed[key]["help"], f"{key} has no help comment"


def test_cli_lists_every_parameter_of_every_notebook(capsys):
    assert main(["notebooks"]) == 0
    out = capsys.readouterr().out
    for name in notebooks():
        block = out.split(name, 1)[1]
        for field in dataclasses.fields(NOTEBOOKS[name].schema):
            assert f"    {field.name}:" in block, (name, field.name)


def _outside(field: dataclasses.Field, tp: typing.Any) -> list[typing.Any]:
    """Values just outside a field's domain (never its 'profile value' sentinel), plus non-finite ones."""
    d = field.metadata["domain"]
    is_int = int in (tp, *typing.get_args(tp))
    sentinel = field.metadata.get("unset", 0)
    out = []
    if d.lo is not None:
        below = d.lo - (0 if d.lo_open else (1 if is_int else 0.5))
        out.append(below if below != sentinel else below - 1)
    if d.hi is not None:
        out.append(d.hi + (0 if d.hi_open else (1 if is_int else 0.5)))
    if not is_int:
        out += [math.nan, math.inf, -math.inf]
    return [int(v) if is_int and math.isfinite(v) else v for v in out]


def _cases():
    for name, entry in NOTEBOOKS.items():
        hints = typing.get_type_hints(entry.schema)
        for f in dataclasses.fields(entry.schema):
            tp = hints[f.name]
            numeric = {int, float} & {tp, *typing.get_args(tp)}
            if numeric and tp is not bool:
                yield name, f, tp


@pytest.mark.parametrize("name,field,tp", list(_cases()), ids=lambda v: getattr(v, "name", str(v)))
def test_every_numeric_parameter_has_a_domain_that_refuses_values_outside_it(name, field, tp):
    assert "domain" in field.metadata, f"{name}: {field.name} declares no domain"
    for value in _outside(field, tp):
        with pytest.raises(ParameterError, match=rf"'{field.name}' must lie in \S+, \S+ got"):
            check_parameters(name, "tiny", {field.name: value})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("profile", params.PROFILES)
def test_every_profile_resolves_inside_the_domains(name, profile):
    check_parameters(name, profile, {})


@pytest.mark.parametrize("name,key,value,message", [
    ("03_stage_a", "size", "huge", "must be one of"),
    ("05_stage_c", "text_layer", "first", "must be one of"),
    ("02_architecture", "sizes", "tiny,gigantic", "'gigantic' is not one of"),
    ("06_sampling", "strengths", "0.5,1.5", "each value must lie in"),
    ("06_sampling", "guidances", "1,x", "comma-separated numbers"),
    ("03_stage_a", "dataset", "folder", "'data_dir' is required"),
    ("04_stage_b", "grad_accum", 3, "divisible"),
])
def test_names_lists_and_rules_between_fields_are_checked(name, key, value, message):
    with pytest.raises(ParameterError, match=message):
        check_parameters(name, "tiny", {key: value})


def test_bad_value_fails_in_the_cli_before_a_run_folder_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WURST_RUNS_DIR", str(tmp_path))
    with pytest.raises(ParameterError, match="'lr' must lie in"):
        run_notebook("03_stage_a", "smoke", {"lr": -1.0})
    assert list(tmp_path.iterdir()) == []
    assert main(["run", "05_stage_c", "--profile", "smoke", "-p", "p_drop_text", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wurst: error: parameter 'p_drop_text' must lie in [0, 1]") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_cell_has_an_id(name):
    nb = json.loads((paths.NOTEBOOKS / f"{name}.ipynb").read_text())
    assert all(c.get("id") for c in nb["cells"]), "nbformat 4.5 cells need ids"


def test_make_lab_starts_jupyterlab_as_the_current_user(tmp_path):
    import os
    import selectors
    import signal
    import subprocess
    import time

    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "BROWSER": "true"}
    proc = subprocess.Popen(["make", "-s", "lab"], cwd=paths.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = "", time.time() + 90
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while "is running at" not in seen and time.time() < deadline:
            if proc.poll() is not None:
                seen += proc.stdout.read()
                break
            if sel.select(timeout=1):
                seen += proc.stdout.readline()
        assert proc.poll() is None, f"make lab exited at once:\n{seen[-2000:]}"
        assert "is running at" in seen, seen[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
