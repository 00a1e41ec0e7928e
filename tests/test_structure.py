"""Recipes read top to bottom: no function (or method) in a stage's `recipe.py` is longer than MAX_LINES lines.

A longer one is split into named steps (setup, rollout or sampling, update or scoring, save) or its helpers move to a
module of their own beside the recipe (issue 20; STYLE.md "Recipes you read top to bottom")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80
RECIPES = sorted(SRC.glob("*/recipe.py"))


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function in `source` longer than `limit` lines, from
    its `def` (or first decorator) to its last line, docstring and comments included."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    length = child.end_lineno - first + 1
                    if length > limit:
                        out.append((name, first, length))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return out


def test_the_check_counts_lines_from_def_to_end():
    """A 3-line function passes a limit of 3 and fails a limit of 2; a nested one is named by its path."""
    src = "def f():\n    x = 1\n    return x\n\n\ndef g():\n    def h():\n        return 1\n    return h\n"
    assert long_functions(src, limit=3) == [("g", 6, 4)]
    assert long_functions(src, limit=2) == [("f", 1, 3), ("g", 6, 4)]
    assert long_functions(src, limit=1) == [("f", 1, 3), ("g", 6, 4), ("g.h", 7, 2)]


def test_recipes_are_found():
    names = {p.parent.name for p in RECIPES}
    assert {"ppo", "evaluate", "dpo", "sft"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_no_recipe_function_is_longer_than_80_lines(path: Path):
    too_long = long_functions(path.read_text())
    assert not too_long, "; ".join(f"{path.relative_to(SRC.parent)}:{line} {name} is {n} lines (at most {MAX_LINES})"
                                   for name, line, n in too_long)
