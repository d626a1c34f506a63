"""The package's shape: no import cycle between hpclm's modules, public names that are aliases of their
homes, and a command line that builds its parser without loading torch."""
import ast
import sys

import pytest

from conftest import REPO, run_python

PACKAGE = REPO / "hpclm"
PUBLIC_ALIASES = {"hpclm.ops": "hpclm.kernels.ops", "hpclm.nn": "hpclm.kernels.nn", "hpclm.dist": "hpclm.comm.dist",
                  "hpclm.amp": "hpclm.train.amp", "hpclm.probe": "hpclm.comm.ring"}


def module_names() -> dict[str, object]:
    """hpclm's modules (dotted name -> path), packages under their own name."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the hpclm modules it imports anywhere in its body (functions too: a lazy import is
    still a dependency). `from pkg import name` counts as an import of pkg.name when that is a module."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    node_module = ".".join(base + ([node.module] if node.module else []))
                else:
                    node_module = node.module
                for alias in node.names:
                    sub = f"{node_module}.{alias.name}"
                    deps.add(sub if sub in modules else node_module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_hpclm_modules():
    graph = import_graph()
    assert "hpclm.train.loop" in graph and "hpclm.train.classical" in graph["hpclm.train"]  # the walk sees lazy imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_import_homes_not_public_aliases():
    """Inside hpclm every module imports the home of a name (hpclm.comm.dist), never its public alias."""
    graph = import_graph()
    users = {m: sorted(alias for alias in PUBLIC_ALIASES if alias in deps)
             for m, deps in graph.items() if m not in PUBLIC_ALIASES}
    assert {m: a for m, a in users.items() if a} == {}


def test_public_names_are_their_homes():
    proc = run_python(["-c", "import importlib, json, sys; pairs = json.loads(sys.argv[1]); "
                       "print(all(importlib.import_module(a) is importlib.import_module(h) for a, h in pairs.items()))",
                       __import__("json").dumps(PUBLIC_ALIASES)])
    assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "softmax", "--help"],
                                  ["probe", "allreduce", "--help"], ["train", "--no-such-flag"]])
def test_the_command_line_parses_without_torch(argv):
    proc = run_python(["-X", "importtime", "-m", "hpclm", *argv])
    assert proc.returncode in (0, 2), proc.stderr
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "hpclm.cli" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "numpy", "mpi4py", "horovod")]
    assert heavy == []
