"""The package's plan, checked from the source: each unit imports only units on lower floors (or itself), at the top
of the file, with no import circle. A new module must be given its floor here."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wurst_core"

# unit (top-level module or subpackage of wurst_core) -> floor; imports go to lower floors only
FLOORS = {
    "io": 0, "paths": 0, "params": 0,              # foundation: files, places, typed parameter schemas
    "runs": 1,                                     # run folders (config, metrics, figures, checkpoints, log)
    "models": 2, "diffusion": 2, "data": 2,        # networks, diffusion maths, datasets
    "text": 3, "layouts": 3,                       # text encoders (the tiny CLIP trains on the procedural data);
                                                   # checkpoint key layouts and architecture inference
    "training": 4, "weights": 4, "sizes": 4, "evaluation": 4,  # the loop and tasks, formats, run sizes, metrics
    "folders": 4,                                  # where networks and text encoders sit in a pipeline folder
    "adapters": 4,                                 # what plugs into sampling: live previews of Stage C
    "pipeline": 5,                                 # inference: loads through weights, checks through sizes
    "generate": 6,                                 # the checked command-line text-to-image
    "human": 6,                                    # the human preference study: store, rater page, analysis
    "studies": 7,                                  # one per notebook
    "workbench": 8,                                # notebook contract, registry, reproduce, report, CLI
    "__init__": 9, "__main__": 9,
}
MAX_LINES = 560  # a module past this does several jobs


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The wurst_core modules an ``import`` names (the submodule where ``from x import sub`` names one)."""
    if node.level == 0:
        if not (node.module or "").startswith("wurst_core"):
            return []
        base = node.module.split(".")[1:]
    else:
        here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = (here[:len(here) - node.level + 1] if node.level > 1 else here) + (node.module.split(".") if node.module else [])
    target = ".".join(base)
    subs = [f"{target}.{a.name}" if target else a.name for a in node.names]
    found = [s for s in subs if s in MODULES]
    # `from pkg import sub` runs pkg/__init__ first: an edge to the package as well
    package = [target] if target in MODULES and target != module and (found or not subs) else []
    return found + package if found else ([target] if target in MODULES else [])


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    graph, local = defaultdict(set), []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path, node)
                graph[module].update(targets)
                if targets and id(node) not in top:
                    local.append(f"{module}:{node.lineno} imports {targets} inside a function")
            elif isinstance(node, ast.Import) and any(a.name.startswith("wurst_core") for a in node.names):
                local.append(f"{module}:{node.lineno} uses `import wurst_core...`; use a relative import")
    return graph, local


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_every_unit_has_a_floor():
    assert sorted({_unit(m) for m in MODULES} - set(FLOORS)) == []


def test_imports_go_down_only():
    graph, _ = _imports()
    upward = [f"{m} (floor {FLOORS[_unit(m)]}) imports {t} (floor {FLOORS[_unit(t)]})"
              for m, targets in graph.items() for t in targets
              if _unit(t) != _unit(m) and FLOORS[_unit(t)] >= FLOORS[_unit(m)]]
    assert upward == []


def test_no_import_circle_between_modules():
    graph, _ = _imports()
    edges = graph
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_package_imports_are_at_the_top_of_each_file():
    _, local = _imports()
    assert local == []


def test_no_module_does_several_jobs_by_size():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
