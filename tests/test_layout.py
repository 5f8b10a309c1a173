"""The package layout: no import cycles, every module imports alone, the README map matches the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "modelopt_dms"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ``ImportFrom`` node of ``module`` refers to."""
    is_pkg = _modules()[module].name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{a.name}" for a in node.names]
    return [target, *names]


def _import_graph() -> dict[str, set[str]]:
    """Package-internal imports of every module, top level and inside functions alike."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package importing its own submodules (``from . import x`` in __init__) is not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_package_modules():
    graph = _import_graph()
    # edges into a package __init__ stand for its public re-exports; follow its submodules instead
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_in_a_fresh_interpreter():
    """Leaf modules first (fewest package imports), in a new process, so no earlier test's imports help."""
    graph = _import_graph()
    order = sorted(graph, key=lambda m: (len(graph[m]), m))
    code = f"import importlib\nfor m in {order!r}:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mode_declares_only_and_plugins_hold_the_patches():
    tree = ast.parse((PKG / "mode.py").read_text())
    functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert functions == [], f"mode.py should only declare the registry and descriptor, has {functions}"
    assert "from . import mode, plugins" in (PKG / "__init__.py").read_text()
    for name in ("post_init", "register_forward_pre_hook", "_prepare_cache_for_generation"):
        owners = [p for p in PKG.rglob("*.py") if name in p.read_text() and "plugins" not in p.parts]
        assert owners == [], f"{name} is patched outside plugins/: {owners}"


def test_nothing_outside_the_package_reads_private_dms_state():
    offenders = []
    for folder in ("tests", "benchmarks", "examples", "deploy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "test_layout.py" and re.search(r"\._dms\b", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- layout:start -->", 1)[1].split("<!-- layout:end -->", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = {entry for cell in rows for entry in re.findall(r"`([\w./-]+)`", cell)}
    for entry in listed:
        assert (ROOT / entry).exists(), f"README layout names {entry}, which does not exist"
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT)
        covered = str(rel) in listed or any(
            entry.endswith("/") and str(rel).startswith(entry) for entry in listed
        )
        assert covered, f"{rel} is missing from the README layout table"
