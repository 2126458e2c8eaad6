"""The exercise answers in solutions/: every python block runs, in order, in a fresh process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FILES = sorted(SOLUTIONS.glob("[0-9]*.md"))


def python_blocks(path: Path) -> str:
    return "\n\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


def test_every_notebook_with_exercises_has_answers():
    covered = " ".join(p.stem for p in FILES)
    for nb in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"):
        if "## Exercises" in nb.read_text():
            number = nb.stem[:2]
            assert number in covered or any(
                int(a) <= int(number) <= int(b) for a, b in re.findall(r"(\d\d)-(\d\d)", covered)
            ), nb.name


def loads_in_the_machines_dtype(code: str) -> bool:
    """Does the code load a model without naming its dtype (so in the one this CPU kind picks)?"""
    return any("dtype=" not in args for args in load_arguments(code))


def load_arguments(code: str):
    """The arguments of each load_pipeline(...) and start_local_server(...) call in `code`, nested calls included."""
    for call in re.finditer(r"\b(?:load_pipeline|start_local_server)\(", code):
        depth, end = 1, call.end()
        while depth and end < len(code):
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        yield code[call.end() : end - 1]


def test_the_dtype_reading_sees_which_loads_name_a_dtype():
    assert loads_in_the_machines_dtype("pipe = load_pipeline(model_path())")
    assert loads_in_the_machines_dtype(
        "a = load_pipeline(dtype=torch.float32)\nserver = start_local_server()"
    )
    assert not loads_in_the_machines_dtype("a = load_pipeline(model_path(), dtype=torch.float32)\nconfig = 1")
    assert loads_in_the_machines_dtype(  # a call inside a call inside the load: still no dtype named
        'pipe = load_pipeline(model_path(), fit=Fit.budget({"cpu": int(w / 3)}))\nb = load_pipeline(dtype=torch.float32)'
    )


# An answer that loads in the machine's dtype runs again in the other CPU kind's (`make test-other-dtype`);
# one that names its dtype computes the same on both kinds, so it runs once.
ANSWERS = [
    pytest.param(
        p, id=p.stem, marks=[pytest.mark.numerics] if loads_in_the_machines_dtype(python_blocks(p)) else []
    )
    for p in FILES
    if python_blocks(p)
]


@pytest.mark.parametrize("path", ANSWERS)
def test_answer_code_runs(path, tmp_path):
    script = tmp_path / f"{path.stem}.py"
    script.write_text(python_blocks(path))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, f"{path.name}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
