"""Each script reads top to bottom: its main fits on a screen, calls named phases defined above it
in the order it calls them, and holds no function of its own; main comes last."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_sft", "train_dpo", "generate", "evaluate", "analyze", "run_demo")
SCREEN = 60  # lines


def top_level(script: str) -> dict:
    """{name: node} of the script's module-level functions and classes."""
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    return {node.name: node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_fits_on_a_screen(script):
    main = top_level(script)["main"]
    length = main.end_lineno - main.lineno + 1
    assert length <= SCREEN, f"{script}.py: main is {length} lines, over {SCREEN}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_last_and_calls_its_phases_in_the_order_they_are_written(script):
    defined = top_level(script)
    main = defined["main"]
    assert max(node.lineno for node in defined.values()) == main.lineno, f"{script}.py: main is not last"
    # a call nested in another's arguments runs first, and also ends first
    calls = sorted((node for node in ast.walk(main) if isinstance(node, ast.Call)),
                   key=lambda node: (node.end_lineno, node.end_col_offset))
    phases = []
    for call in calls:
        if isinstance(call.func, ast.Name) and call.func.id in defined and call.func.id not in phases:
            phases.append(call.func.id)
    lines = [defined[name].lineno for name in phases]
    assert lines == sorted(lines), f"{script}.py: main calls {phases}, written in another order"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_holds_no_function_of_its_own(script):
    """What main needs passes through arguments and return values: no closure, no nonlocal state."""
    main = top_level(script)["main"]
    inner = [node for node in ast.walk(main) if node is not main and
             isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Global, ast.Nonlocal))]
    assert not inner, f"{script}.py: main holds {type(inner[0]).__name__} at line {inner[0].lineno}"
