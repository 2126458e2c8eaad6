"""helpers/ stays layered and small: every import (function-level ones too) points down the table
below, notebooks import `from helpers import ...` only, and `helpers.__all__` is exactly what they use."""
import ast
import json
import re
from pathlib import Path

import pytest

import helpers

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ROOT / "helpers"

# Each file's layer; a file may import only from lower layers (README's "The code" has the picture).
LAYERS = {
    "data": 0,                                              # the blog's facts, known models and GPUs, env names
    "files": 1, "hardware": 1,                              # cache folder, atomic writes; the machine
    "policies": 1,                                          # which expert a cache evicts, replayed over traces
    "fitting": 1,                                           # how a model fits (fit=), what was loaded (LoadRecord)
    "sizing": 2,                                            # parameters, bytes, ceilings, the fit check
    "prompts": 3, "standin": 3, "fastpath": 3, "planning": 3, "checking": 3,
    "quantize": 4, "offload": 4, "sandbox": 4,              # experts replaced: quantized, or cached; model code run
    "loading": 5, "prefetch": 5,                            # model path, the blog's pipeline call; experts fetched ahead
    "backends": 6,                                          # LocalModel / Endpoint: what answers
    "generation": 7,                                        # knobs checked once; generate*
    "widgets": 8, "serving": 8, "moe": 8,                   # what notebooks touch
    "room_server": 8,                                       # the server program that serving.py runs
    "__init__": 9,                                          # the front door
}
# `total` is helpers/' measured size (README, The code), so that it cannot grow unnoticed: a change that adds a
# capability raises it and says so in the README; one that removes code lowers it. The history is in git log.
LIMITS = dict(total=4646, file=400, function=60)


def helper_imports(path: Path) -> set[str]:
    """The helpers modules a file imports, wherever the import sits (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:                       # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:                                     # from . import x
                found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "helpers":
                found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
    return found


def python_files():
    return sorted(HELPERS.glob("*.py"))


def test_every_file_has_a_layer():
    names = {p.stem for p in python_files()} - {"sandbox_child"}  # a program run in a child process, never imported
    assert names == set(LAYERS), f"add new files to LAYERS (or remove stale ones): {names ^ set(LAYERS)}"


def test_the_sandbox_child_imports_nothing_of_helpers():
    child = HELPERS / "sandbox_child.py"  # a program run in a separate process: it must stand alone
    assert helper_imports(child) == set() and "import helpers" not in child.read_text()


@pytest.mark.parametrize("path", [p for p in python_files() if p.stem != "sandbox_child"], ids=lambda p: p.stem)
def test_imports_point_down_only(path):
    level = LAYERS[path.stem]
    upward = sorted(m for m in helper_imports(path) if LAYERS.get(m, 99) >= level and m != path.stem)
    assert not upward, f"{path.name} (layer {level}) imports {upward}: move the shared part down a layer"
    text = path.read_text()
    assert not re.search(r"^\s*(from|import) (benchmarks|workshop|harness)\b", text, re.M), "helpers must not import tooling"


def test_the_checker_sees_function_level_and_upward_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .data import TASKS\n\ndef f():\n    from .widgets import SamplingPanel\n    from . import moe\n")
    assert helper_imports(probe) == {"data", "widgets", "moe"}


def test_no_cycle_in_the_import_graph():
    graph = {p.stem: helper_imports(p) - {p.stem} for p in python_files()}

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join(path + [node])}"
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
    for node in graph:
        visit(node, [])


def test_size_limits():
    total = 0
    for path in python_files():
        text = path.read_text()
        lines = len(text.splitlines())
        total += lines
        assert lines <= LIMITS["file"], f"{path.name}: {lines} lines, more than {LIMITS['file']}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= LIMITS["function"], f"{path.name}: {node.name} is {length} lines"
    assert total <= LIMITS["total"], f"helpers/ is {total} lines, more than {LIMITS['total']}"


def test_the_readme_states_the_measured_size():
    lines = sum(len(p.read_text().splitlines()) for p in python_files())
    stated = re.search(r"`helpers/` is ([\d,]+) lines", (ROOT / "README.md").read_text())
    assert stated, "README's 'The code' says how many lines helpers/ has"
    assert abs(int(stated.group(1).replace(",", "")) - lines) <= 25, f"README: {stated.group(1)}, measured {lines}"


def reader_imports():
    """(where, module, names) for every helpers import in the notebooks and their exercise answers."""
    found = []
    sources = [(p.name, "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]
                                  if c["cell_type"] == "code"))
               for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    sources += [(p.name, "\n".join(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)))
                for p in sorted((ROOT / "solutions").glob("*.md"))]
    for where, code in sources:
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "helpers", "benchmarks", "workshop", "harness"):
                found.append((where, node.module, {a.name for a in node.names}))
            elif isinstance(node, ast.Import):
                found += [(where, a.name, set()) for a in node.names if a.name.split(".")[0] == "helpers"]
    return found


def test_notebooks_import_from_helpers_only():
    wrong = [(where, module) for where, module, _ in reader_imports() if module != "helpers"]
    assert not wrong, f"use `from helpers import ...` (and never the tooling): {wrong}"


def test_all_is_exactly_what_notebooks_use():
    used = set().union(*(names for _, _, names in reader_imports()))
    assert set(helpers.__all__) == used, (f"unused in notebooks: {sorted(set(helpers.__all__) - used)}; "
                                          f"missing from __all__: {sorted(used - set(helpers.__all__))}")
    assert len(helpers.__all__) == len(set(helpers.__all__))


def test_notebooks_never_ask_which_backend_they_hold():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        # `.base_url`: an endpoint's URL read back (handing a URL to another client, base_url=..., is fine)
        for pattern in (r"hasattr\(pipe", r"isinstance\([^)]*Endpoint", r"\bglobal\b", r"\.base_url"):
            assert not re.search(pattern, code), f"{path.name}: {pattern}"
