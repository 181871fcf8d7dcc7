"""The server holds no task branches: outside ``service/core/tasks/`` (and training), no code compares a value
with a task name literal. Tasks are looked up by ``manifest.task`` and asked for capabilities instead."""

from __future__ import annotations

import ast
from pathlib import Path

from service.core.tasks import TASKS

SERVICE = Path(__file__).resolve().parents[2] / "service"


def _literals(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [v for elt in node.elts for v in _literals(elt)]
    return []


def task_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines where a comparison (==, !=, in, ...) involves a literal that is a task name."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Compare)
        and any(v in names for side in (node.left, *node.comparators) for v in _literals(side))
    ]


def test_the_checker_finds_a_task_branch() -> None:
    code = 'if m.task == "charlm":\n    pass\nx = t in ("forecast", "other")\ny = name == "charlm-like"\n'
    assert task_comparisons(code, {"charlm", "forecast"}) == [1, 3]


def test_no_comparison_with_a_task_name_outside_the_tasks_package() -> None:
    names = set(TASKS)
    assert {"sentiment", "charlm", "forecast"} <= names
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        rel = path.relative_to(SERVICE)
        if rel.parts[:2] in (("core", "tasks"), ("api", "gen")):
            continue
        offenders += [f"{rel}:{line}" for line in task_comparisons(path.read_text(), names)]
    assert not offenders, "comparisons with task names:\n" + "\n".join(offenders)
