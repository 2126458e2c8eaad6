"""The notebooks' shape (nbval re-executes them; this checks what they promise to a reader)."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from helpers import TASKS
from workshop.walkthrough import (
    ANSWER_TAG,
    BLOG_WALKTHROUGH,
    BUILD,
    MEASURED,
    answers,
    build_folder,
    main,
    notebook_paths,
    selected,
    stamp,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {p.stem: p for p in notebook_paths()}
TASK_NOTEBOOKS = {"02_poem": "poem", "03_code": "code", "04_jokes": "jokes", "05_translation": "translation"}


def test_the_six_walkthrough_notebooks_exist():
    assert {"00_setup", "01_loading", *TASK_NOTEBOOKS} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_and_closes_the_same_way(name):
    nb = json.loads(NOTEBOOKS[name].read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"  # no "Select Kernel" dialog
    first, last = nb["cells"][0], nb["cells"][-1]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")
    assert "What you will learn" in "".join(first["source"]) and "Hardware and time" in "".join(
        first["source"]
    )
    assert "## Summary" in "".join(last["source"]) and "## Exercises" in "".join(last["source"])
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), (
        "commit notebooks with the stand-in's outputs (make notebooks)"
    )
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_header_time_is_the_measured_one(name):
    """The "about N s" of each header comes from the last `make notebooks` run, kept within 2x of it."""
    nb = json.loads(NOTEBOOKS[name].read_text())
    measured = nb["metadata"].get("measured")
    assert measured, "make notebooks records each run's time and peak memory in the notebook's metadata"
    phrase = MEASURED.search("".join(nb["cells"][0]["source"]))
    assert phrase, "the header says how long the notebook takes, in the phrase make notebooks updates"
    number, unit = re.match(r"about ([\d,]+) (s|min)", phrase.group(0)).groups()
    stated = int(number.replace(",", "")) * (60 if unit == "min" else 1)
    assert measured["seconds"] / 2 <= stated <= measured["seconds"] * 2, (stated, measured)


def test_readme_run_times_are_the_notebooks_measured_ones():
    """README's opening compares the two halves of the package by the times `make notebooks` recorded."""
    readme = (ROOT / "README.md").read_text()
    seconds = {
        name: json.loads(path.read_text())["metadata"]["measured"]["seconds"]
        for name, path in NOTEBOOKS.items()
    }
    walkthrough = sum(s for name, s in seconds.items() if name[:2] <= "05")
    ours = sum(s for name, s in seconds.items() if name[:2] > "05")
    said = re.search(
        r"00-05 took ([\d,]+) s .*?06-11 took ([\d,]+) s, ([\d.]+) times as long", readme, flags=re.S
    )
    assert said, "README states both halves' run times"
    assert [int(said.group(1).replace(",", "")), int(said.group(2).replace(",", ""))] == [walkthrough, ours]
    assert float(said.group(3)) == round(ours / walkthrough, 1)


def test_stamp_records_the_run_and_rewrites_the_header():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell(
                "x: about 0 s with the stand-in on a 2-core CPU (measured by `make notebooks`)."
            )
        ]
    )
    stamp(nb, 143.0, 2100, 900)
    assert nb.metadata["measured"]["seconds"] == 143 and nb.metadata["measured"]["kernel_peak_mib"] == 2100
    assert nb.cells[0].source.startswith("x: about 2 min with the stand-in on a ")
    stamp(nb, 23.0, 1, 1)
    assert "about 25 s with" in nb.cells[0].source


def as_python(nb) -> str:
    """A notebook's code cells as one program: a shell line (`!cmd {expr}`) keeps only its {expressions}."""
    lines = []
    for cell in nb.cells:
        for line in cell.source.splitlines() if cell.cell_type == "code" else []:
            shell = line.lstrip().startswith(("!", "%"))
            lines += [f"({e})" for e in re.findall(r"\{([^{}]+)\}", line)] if shell else [line]
    return "\n".join(lines)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_unused_import_or_undefined_name(name):
    from pyflakes.api import check
    from pyflakes.reporter import Reporter
    import io

    out = io.StringIO()
    check(as_python(nbformat.read(NOTEBOOKS[name], as_version=4)), name, Reporter(out, out))
    assert out.getvalue() == "", out.getvalue()


def test_the_import_check_sees_shell_lines():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, os\n!{sys.executable} x.py")])
    assert as_python(nb) == "import sys, os\n(sys.executable)"


@pytest.mark.parametrize("name, task", TASK_NOTEBOOKS.items())
def test_task_notebooks_keep_the_blog_prompt_and_budget(name, task):
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert f'prompt = "{TASKS[task]["prompt"]}"' in sources
    assert f"max_new_tokens = {TASKS[task]['max_new_tokens']}" in sources
    assert "sampling = dict(BLOG_SAMPLING)" in sources
    assert len(answers(nb)) == 1 and "tok/s" in answers(nb)[0]


def test_answers_are_read_from_tagged_cells_only():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output("stream", text="noise")]),
            nbformat.v4.new_code_cell(
                "y",
                metadata={"tags": [ANSWER_TAG]},
                outputs=[nbformat.v4.new_output("stream", text="the answer")],
            ),
        ]
    )
    assert answers(nb) == ["the answer"]


def test_make_run_runs_the_blogs_walkthrough_and_run_all_runs_every_notebook():
    assert [p.stem for p in selected([])] == list(BLOG_WALKTHROUGH)
    assert [p.stem for p in selected(["--inplace"])] == list(BLOG_WALKTHROUGH)
    assert selected(["--all"]) == notebook_paths() and len(notebook_paths()) > len(BLOG_WALKTHROUGH)
    assert [p.stem for p in selected(["06", "08"])] == ["06_sampling_lab", "08_performance"]


def test_the_executed_copies_go_to_build_unless_told(tmp_path):
    assert build_folder([]) == build_folder(["--all", "02"]) == BUILD
    assert build_folder(["--build=x", f"--build={tmp_path}/out", "02"]) == tmp_path / "out"
    assert [p.stem for p in selected([f"--build={tmp_path}", "02"])] == ["02_poem"]  # not taken for a name


def test_an_unknown_notebook_name_is_refused_before_anything_runs(capsys):
    assert main(["no_such_notebook"]) == 2
    assert "no notebook matches 'no_such_notebook'" in capsys.readouterr().err


def test_help_and_unknown_options_run_nothing(capsys):
    assert main(["--help"]) == 0 and "--inplace" in capsys.readouterr().out
    assert main(["--inpalce", "08"]) == 2 and "unknown option --inpalce" in capsys.readouterr().err


def test_glossary_defines_the_terms_and_points_to_real_notebooks():
    text = (NOTEBOOKS["00_setup"].parent.parent / "docs" / "glossary.md").read_text()
    for term in (
        "Active parameters",
        "Ceiling",
        "chrF",
        "Control token",
        "Decode",
        "Expert",
        "Expert cache",
        "Expert parallelism",
        "GCD",
        "Hit rate",
        "KL divergence",
        "Load balancing",
        "MoE",
        "Offloading",
        "Perplexity",
        "Quantization",
        "Tensor parallelism",
        "Top-k",
        "Top-p",
        "TTFT",
        "Upcycling",
    ):
        assert f"**{term}" in text, term
    named = re.findall(r"`(\d\d_\w+)`", text)
    assert named and set(named) <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", ["02_poem", "03_code", "04_jokes", "05_translation", "06_sampling_lab"])
def test_each_widget_is_followed_by_its_photograph(name):
    """Static readers see the panels: after each widget cell, a markdown cell shows the photograph that
    `make screenshots` took of it in a real browser, and the image is in the repository."""
    from workshop.browser import IMAGES, SHOT_TAG, WIDGETS

    assert name in WIDGETS
    cells = nbformat.read(NOTEBOOKS[name], as_version=4).cells
    shots = [i for i, c in enumerate(cells) if SHOT_TAG in c.metadata.get("tags", [])]
    assert len(shots) == 1 and cells[shots[0]].cell_type == "markdown"
    widget = cells[shots[0] - 1]
    assert widget.cell_type == "code" and (
        "SamplingPanel(" in widget.source or "distribution_explorer(" in widget.source
    )
    image = IMAGES / f"widget-{name}.png"
    assert f"(../docs/images/{image.name})" in cells[shots[0]].source
    assert (
        image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    )
