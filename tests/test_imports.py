"""Import structure: the graph inside shards/ is a DAG, every shards module imports on its own, and the
layers cxrbase ← shards ← cxr ← launch import only downward.

The graph is read from the source with `ast` (every ``import shards.x`` / ``from shards.x
import`` anywhere in a module, function-level ones included), not from what the modules
report about themselves; each module is then imported alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "shards").glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The shards modules ``shards/<module>.py`` imports (by name), anywhere in its body."""
    tree = ast.parse((ROOT / "shards" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "shards":
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from shards import x
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "shards" and len(parts) > 1:
                    found.add(parts[1])
    return found & set(MODULES)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (depth-first search with three colours)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself must be able to fail: the old splits ↔ stats loop, and a longer one
    assert _cycle({"splits": {"stats"}, "stats": {"splits"}}) == ["splits", "stats", "splits"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_parser_sees_function_level_imports():
    assert "records" in _imports("stats")  # a top-level import
    assert "pack_journal" in _imports("records")  # imported inside _file_sha256
    assert "tar_writer" in _imports("derive")  # imported inside derive_shard


def test_shards_import_graph_is_acyclic():
    graph = {m: _imports(m) for m in MODULES}
    assert _cycle(graph) is None, f"import cycle inside shards/: {' → '.join(_cycle(graph))}"


ALONE = [m for m in MODULES if m != "__main__"]  # __main__ runs the CLI


@pytest.fixture(scope="module")
def imported_alone():
    """One fresh interpreter per module, all started at once (each spends most of its time importing)."""
    procs = {
        module: subprocess.Popen(
            [sys.executable, "-c", f"import shards.{module}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ALONE
    }
    done = {}
    try:
        for module, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            done[module] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.integration  # a fresh interpreter per module
@pytest.mark.parametrize("module", ALONE)
def test_each_module_imports_alone_in_a_fresh_interpreter(module, imported_alone):
    returncode, stderr = imported_alone[module]
    assert returncode == 0, stderr


LIGHT_START = """
import sys
import cxr.evaluate, cxr.train
from accelerate import Accelerator
from cxr.config import load_config
from cxr.models import REGISTRY, build_model
from cxr.runs.distributed import configure_numerics, unwrap_model
import torch
cnn = build_model("cnn")
build_model("ood_ae")
configure_numerics(load_config(None, ["train.deterministic=true"]), cuda=False)
assert torch.are_deterministic_algorithms_enabled()
accelerator = Accelerator(cpu=True)
assert unwrap_model(accelerator, accelerator.prepare(cnn)) is cnn
print(sorted(m for m in ("timm", "torchvision", "torch._inductor", "deepspeed") if m in sys.modules))
print(REGISTRY["vit"].description)
build_model("densenet121")
print("timm" in sys.modules)
"""


@pytest.mark.integration  # a fresh interpreter
def test_a_cnn_process_never_imports_timm_inductor_or_deepspeed():
    """cxr/models/__init__.py imports a family when it is first built, configure_numerics leaves torch._inductor
    alone when nothing compiles, and unwrap_model does not import deepspeed (each ~1-1.6 CPU s per process):
    a process that trains or evaluates a cnn never loads them; a timm family still does, on its build."""
    done = subprocess.run([sys.executable, "-c", LIGHT_START], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "[]",
        "ViT-B/16, any input size (interpolated position embeddings), mean-pooled tokens",
        "True",
    ], done.stdout


# ----- layers: cxrbase ← shards ← cxr ← launch (each imports only the layers before it) -----

LAYERS = ("cxrbase", "shards", "cxr", "launch")


def _top_level_imports(path: Path) -> set[str]:
    """The top-level package names a file imports anywhere in its body (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


def _upward_imports(root: Path) -> list[str]:
    bad = []
    for rank, layer in enumerate(LAYERS):
        above = set(LAYERS[rank + 1 :])
        for path in sorted((root / layer).rglob("*.py")):
            bad += [f"{path.relative_to(root)} imports {name}" for name in sorted(_top_level_imports(path) & above)]
    return bad


def test_layer_checker_finds_a_planted_upward_import(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "m.py").write_text("import os\n")
    (tmp_path / "shards" / "bad.py").write_text("def f():\n    from cxr.train import main\n")
    assert _upward_imports(tmp_path) == ["shards/bad.py imports cxr"]


def test_no_layer_imports_a_layer_above_it():
    assert _upward_imports(ROOT) == []


# ----- cxr/: its modules and sub-packages form a DAG (function-level imports included) -----


def _package_modules(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of a package and its sub-packages (``a.b`` for a/b/__init__.py)."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Each module's imports of modules of the same package, relative imports resolved, anywhere in its body
    (``from cxr.models import x`` counts as importing cxr.models.x when that is a module, else cxr.models)."""
    modules = _package_modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    found.add(candidate)
                    break
        graph[name] = found
    return graph


def test_module_graph_resolves_relative_and_function_level_imports(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import b\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("from ..a import f\n")
    graph = _module_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert _cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_cxr_import_graph_is_acyclic():
    graph = _module_graph(ROOT, "cxr")
    assert _cycle(graph) is None, f"import cycle inside cxr/: {' → '.join(_cycle(graph))}"


def test_no_test_module_imports_another():
    """Shared builders live in tests/helpers.py and tests/conftest.py, never in a test module."""
    found = [
        f"{path.name} imports {name}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for name in sorted(_top_level_imports(path))
        if name.startswith("test_")
    ]
    assert found == []


# ----- cxr/'s rooms: each imports only itself and the rooms below it -----

# bottom to top; a room is a sub-package of cxr/ or one of its root modules
ROOMS = ("cuda_check", "data", "models", "config", "runs", "evaluation", "training", "tools", "train", "evaluate")


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _upward_room_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {room: i for i, room in enumerate(ROOMS)}
    bad = []
    for module, targets in sorted(graph.items()):
        if module == "cxr":
            continue
        for target in sorted(targets):
            if rank[_room(target)] > rank[_room(module)]:
                bad.append(f"{module} imports {target} (room {_room(target)} is above {_room(module)})")
    return bad


def test_room_checker_finds_a_planted_upward_import():
    graph = {"cxr.models.a": {"cxr.data.b"}, "cxr.data.b": {"cxr.tools.c"}, "cxr.tools.c": set()}
    assert _upward_room_imports(graph) == ["cxr.data.b imports cxr.tools.c (room tools is above data)"]


def test_every_cxr_module_is_in_a_named_room_and_imports_only_downward():
    graph = _module_graph(ROOT, "cxr")
    unplaced = sorted({_room(m) for m in graph if m != "cxr"} - set(ROOMS))
    assert unplaced == [], f"cxr/ modules outside the rooms of tests/test_imports.ROOMS: {unplaced}"
    assert _upward_room_imports(graph) == []
