"""The package's layering, enforced: every module belongs to one stage, and no module imports a stage above
its own (function-level imports included), so there is no import cycle between stages; inside a stage the
file-level import graph has no cycle either.

Stages, bottom to top (README "Layout"): foundations; shared concepts (shipped assets, data sources and
templates, the results store, the run directory, tiny test models); methods; model/adapter loading;
training; evaluation; analysis; reports; experiments (recipes); the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "disel"

STAGES: list[tuple[str, ...]] = [
    ("disel.errors", "disel.utils"),
    (
        "disel.assets",
        "disel.data",
        "disel.results",
        "disel.rundir",
        "disel.testing",
        "disel.testing_tokenizers",
    ),
    ("disel.methods",),
    ("disel.loading",),
    ("disel.training",),
    ("disel.evaluation",),
    ("disel.analysis",),
    ("disel.report",),
    ("disel.experiments",),
    ("disel.commands", "disel.cli"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> int | None:
    for i, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def imports_of(path: Path, mod: str | None = None) -> set[str]:
    """Every ``disel...`` module a file imports, at any depth of the file (lazy imports count); ``mod`` is
    the file's module name (default: from its path under src/)."""
    mod = mod or module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "disel")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "disel":
                continue
            out.add(target)
            # ``from .pkg import mod`` imports the submodule pkg.mod when there is one
            for a in node.names:
                candidate = f"{target}.{a.name}"
                if (SRC / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    SRC / Path(*candidate.split(".")) / "__init__.py"
                ).is_file():
                    out.add(candidate)
    return out


FILES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_stage():
    loose = [module_name(p) for p in FILES if module_name(p) != "disel" and stage_of(module_name(p)) is None]
    assert not loose, f"modules outside every stage (add them to STAGES and the README layout): {loose}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_module_imports_a_stage_above_its_own(path):
    mod = module_name(path)
    if mod == "disel":  # the facade: names load lazily, on first use
        return
    here = stage_of(mod)
    upward = sorted(t for t in imports_of(path) if (s := stage_of(t)) is not None and s > here)
    assert not upward, f"{mod} (stage {here}) imports upward: {upward}"


def test_no_import_cycle_between_files():
    graph = {module_name(p): {t for t in imports_of(p) if t != module_name(p)} for p in FILES}
    # a package's __init__ that only re-exports is not an edge target worth following through itself
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            # importing a sub-module also runs its package's __init__; a child importing its own package
            # (``from . import x``) is how packages are built, not a cycle between files
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for n in sorted(graph):
        if state.get(n) is None and (cycle := visit(n)):
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")


def test_the_check_itself_catches_an_upward_import(tmp_path):
    """The rule is not vacuous: a training module importing an experiment is flagged."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from ..experiments import demo\n", encoding="utf-8")
    found = imports_of(f, "disel.training.probe")
    assert "disel.experiments" in found and stage_of("disel.experiments") > stage_of("disel.training.probe")
