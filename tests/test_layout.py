"""The package layout is the design: tasks side by side, shared rooms below them, no cycles, no upward imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "autoprog"

# What each part of the package may import: a part sees only parts of a lower or equal rank, and the two
# tasks never see each other.
RANK = {
    "errors": 0, "formats": 0,
    "space": 1, "schedules": 1, "engine": 1, "metrics": 1, "data": 1, "report": 1, "optim": 1, "options": 1, "front": 1,
    "budget": 1, "steptime": 1, "methods": 1, "checkpoint": 1, "tracking": 1, "compute": 1, "rng": 0, "accelerator": 1,
    "ema": 1,
    "controllers": 2, "experiment": 2, "models": 2,
    "adapters": 3,
    "algorithms": 4,
    "loop": 5, "classification": 5, "diffusion": 5,
    "cli": 6,
}
TASKS = {"classification", "diffusion"}


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every autoprog import, module- or function-level."""
    out = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mod = ".".join(parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if f.name == "__init__.py" else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if node.level and target == "autoprog":  # "from .. import x": x is the module
                    out += [(mod, f"autoprog.{a.name}", node.lineno) for a in node.names]
                elif target.startswith("autoprog"):
                    out.append((mod, target, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(mod, a.name, node.lineno) for a in node.names if a.name.startswith("autoprog")]
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_has_a_rank():
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts <= set(RANK), f"give these a rank in RANK: {sorted(parts - set(RANK))}"


def test_no_upward_imports_and_tasks_apart():
    bad = []
    for src, dst, line in _imports():
        a, b = _part(src), _part(dst)
        if not a or not b or a == b:
            continue
        if RANK[b] > RANK[a] or (a in TASKS and b in TASKS):
            bad.append(f"{src}:{line} imports {dst}")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = {m for m, _, _ in _imports()}
    edges: dict[str, set[str]] = {}
    for src, dst, _ in _imports():
        while dst and dst not in mods:
            dst = dst.rpartition(".")[0]
        if dst and dst != src and not (src == dst.rpartition(".")[0] and src.count(".") < 2):
            edges.setdefault(src, set()).add(dst)

    def reach(a, b, seen):
        return any(n == b or (n not in seen and not seen.add(n) and reach(n, b, seen)) for n in edges.get(a, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reach(b, a, set())})
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("task", ["autoprog.classification", "autoprog.diffusion", "autoprog.cli", "torch"])
def test_import_autoprog_imports_no_task(task):
    code = f"import sys, autoprog; print({task!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"import autoprog imported {task}"


def test_lazy_exports_resolve():
    import autoprog

    for name in autoprog.__all__:
        assert getattr(autoprog, name) is not None, name


def test_one_step_loop_for_every_task():
    """The engine's ``_fit`` is the only step loop: the tasks supply batches and a step, never a loop of their own."""
    loops = [(f.relative_to(PKG), n.name) for f in PKG.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
             if isinstance(n, ast.FunctionDef) and n.name == "_fit"]
    assert loops == [(Path("engine.py"), "_fit")]
