"""The layout of the code: what imports what, read from the source with `ast`.

Floors, lowest first, and what a module on each may import (never anything of a higher floor):
  ground   support.startup, support.files, support.cli: nothing of ours but support.startup
  model    llama: nothing of ours
  methods  aligner, lora, prompt_tuning: llama and the ground only, never one another
  formats  support.formats and its modules: the floors below, and one another
  support  support.data, .distributed, .questions, .trainer, .build_demo: below, and one another
  scripts  the top level's scripts and bench/: anything below, and one another
  tests    anything
"""

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUND = {"support.startup", "support.files", "support.cli"}
METHODS = {"aligner", "lora", "prompt_tuning"}
SUPPORT = {"support.data", "support.distributed", "support.questions", "support.trainer", "support.build_demo"}
FLOORS = ["ground", "model", "methods", "formats", "support", "scripts", "tests"]
MAY_IMPORT = {"ground": set(), "model": set(), "methods": {"ground", "model"},
              "formats": {"ground", "model", "methods", "formats"},
              "support": {"ground", "model", "methods", "formats", "support"},
              "scripts": {"ground", "model", "methods", "formats", "support", "scripts"}, "tests": set(FLOORS)}
TOP_LEVEL = {"llama.py", "aligner.py", "lora.py", "prompt_tuning.py", "train_sft.py", "train_dpo.py", "generate.py",
             "evaluate.py", "analyze.py", "run_demo.py", "README.md", "requirements.txt", "requirements-analysis.txt",
             "pytest.ini", "bench", "demo", "docs", "tests", "support"}


def project_modules(root: Path) -> dict:
    """{module name: path} for every .py file of the project; bench's and tests' files by their bare
    names under their folder's (bench.run), as they import one another by the bare name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0].startswith(".") or parts[0] == "demo":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def floor(module: str) -> str:
    if module in GROUND:
        return "ground"
    if module == "llama":
        return "model"
    if module in METHODS:
        return "methods"
    if module == "support.formats" or module.startswith("support.formats."):
        return "formats"
    if module in SUPPORT or module == "support":
        return "support"
    if module.startswith("tests.") or module == "conftest":
        return "tests"
    return "scripts"


def imports_of(module: str, path: Path, modules: dict) -> set:
    """The project modules that `module` imports, anywhere in it (a function's own imports too).
    `from p import name` counts as p.name where that is a module, else as p; a bare name is first
    looked for beside the file (bench and tests put their own folder on sys.path)."""
    folder = module.rsplit(".", 1)[0] + "." if module.startswith(("bench.", "tests.")) else ""

    def resolve(name: str):
        for candidate in (folder + name, name) if folder else (name,):
            if candidate in modules:
                return candidate
        return None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{alias.name}" if resolve(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found |= {resolve(name) for name in names} - {None}
    return found - {module}


def import_graph(root: Path = ROOT) -> dict:
    modules = project_modules(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return stack[stack.index(imported):] + [imported]
            if imported not in state:
                cycle = visit(imported)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def arrows_back_up(graph: dict) -> list:
    """Every import its floor does not allow (MAY_IMPORT): one that runs up a floor, or sideways
    where the floor's modules stand alone. The ground's one import is support.startup."""
    wrong = []
    for module, imported in graph.items():
        for other in imported:
            ground_to_startup = floor(module) == "ground" and other == "support.startup"
            if floor(other) not in MAY_IMPORT[floor(module)] and not ground_to_startup:
                wrong.append(f"{module} ({floor(module)}) imports {other} ({floor(other)})")
    return sorted(wrong)


# -----------------------------------------------------------------------------
# the checks

def test_the_project_imports_in_no_circle():
    graph = import_graph()
    assert {"llama", "aligner", "support.formats", "support.trainer", "train_sft"} <= set(graph)  # all were read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_runs_back_up_a_floor():
    assert arrows_back_up(import_graph()) == []


def test_the_ground_and_the_model_import_nothing_above_them():
    graph = import_graph()
    assert graph["llama"] == set()
    assert graph["support.startup"] == set() and graph["support.files"] == set()
    assert graph["support.cli"] <= {"support.startup"}
    for method in METHODS:
        assert graph[method] <= GROUND | {"llama"}, method


def test_the_checks_see_a_circle_and_an_arrow_back_up():
    """The checks above can fail: a graph with a circle, and imports that run upwards, are caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert arrows_back_up({"llama": {"support.files"}, "aligner": {"lora"}, "support.files": {"support.formats"},
                           "support.cli": {"support.startup"}, "support.formats.meta": {"support.formats.hf"}}) == [
        "aligner (methods) imports lora (methods)", "llama (model) imports support.files (ground)",
        "support.files (ground) imports support.formats (formats)"]


def test_every_support_module_says_in_its_first_line_what_it_holds():
    for module, path in project_modules(ROOT).items():
        if module.split(".")[0] != "support":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip().endswith("."), f"{path}: no one-line summary opens its docstring"
    package = ast.parse((ROOT / "support" / "__init__.py").read_text()).body
    assert len(package) == 1 and isinstance(package[0], ast.Expr), "support/__init__.py holds a docstring alone"


def test_the_top_level_holds_only_what_the_method_and_its_users_need():
    python_files = {p.name for p in ROOT.glob("*.py")}
    assert python_files <= TOP_LEVEL, sorted(python_files - TOP_LEVEL)
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:  # a git checkout: every tracked entry at the top (a copy outside git has none)
        tracked = {line.split("/")[0] for line in listed.stdout.splitlines()} - {""}
        assert {name for name in tracked if not name.startswith(".")} <= TOP_LEVEL
