"""Every measured figure the README and the guide quote comes from a committed run, and says which.

A quote is a paragraph, list item or table that follows a marker comment (invisible when rendered):

    <!-- figures: benchmarks/results/2026-12-03-xeon-amx.json, notebooks/10_quantization.ipynb -->

Every number in it must be in one of the named sources: a results file (any number it holds, at the
precision quoted, scaled by the unit written after it: % of a fraction, MiB, GiB, GB/s of bytes; or a
number inside one of its strings), a results file's Markdown twin or a notebook's stored outputs (the number as
printed). Any line that
states a speed (tok/s, GB/s) must sit in such a quote.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/workshop.md", "docs/glossary.md", "docs/speed-runs.md"]
MARKER = re.compile(r"<!-- figures: (.+?) -->")
NUMBER = re.compile(r"(?<![\w.\-/#])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?=\s*(%|MiB|GiB|GB/s|x\b|[^\w]|$))")
SPEED = re.compile(r"\d\s*(tok/s|GB/s)")
SPEED_COLUMN = re.compile(r"tok/s|GB/s")
SCALES = {"%": (1, 100), "MiB": (1, 2**-20), "GiB": (1, 2**-30), "GB/s": (1, 1e-9)}


def quotes(text: str):
    """(marker's sources, the quoted lines, first line number) for each marker; and the lines no marker covers."""
    lines, found, bare = text.splitlines(), [], []
    i = 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        if not m:
            bare.append((i + 1, lines[i]))
            i += 1
            continue
        start, i = i + 1, i + 1
        while (
            i < len(lines)
            and lines[i].strip()
            and not MARKER.search(lines[i])
            and (i == start or not re.match(r"\s*- ", lines[i]))
        ):
            i += 1
        found.append(([s.strip() for s in m.group(1).split(",")], lines[start:i], start + 1))
    return found, bare


def numbers_in(line: str):
    """(value, decimals, unit) for each number quoted, dates and version numbers left out."""
    line = re.sub(r"\d{4}-\d{2}-\d{2}", " ", line)
    line = re.sub(r"`[^`]*`", " ", line)  # code: names and arguments, not figures
    line = re.sub(r"\(?https?://\S+", " ", line)
    out = []
    for m in NUMBER.finditer(line):
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3)
        out.append((float(whole.replace(",", "") + frac), len(frac) - 1 if frac else 0, unit))
    return out


def leaves(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, str):
        for value, _, _ in numbers_in(obj):
            yield value
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v)


def source_check(path: str):
    """A function (value, decimals, unit) -> bool: is this number in the source?"""
    file = ROOT / path
    assert file.exists(), f"{path} is cited for figures but is not in the repository"
    if path.endswith((".ipynb", ".md")):
        printed = [file.read_text()] if path.endswith(".md") else []
        for cell in json.loads(file.read_text())["cells"] if path.endswith(".ipynb") else []:
            for out in cell.get("outputs", []):
                printed.append(
                    "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                )
        held = {(v, d) for text in printed for line in text.splitlines() for v, d, _ in numbers_in(line)}
        return lambda value, decimals, unit: (value, decimals) in held
    values = list(leaves(json.loads(file.read_text())))

    def check(value, decimals, unit):
        scales = SCALES.get(unit, (1,))
        return any(abs(round(v * s, decimals) - value) < 1e-9 for v in values for s in scales)

    return check


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_figure_is_in_the_run_it_cites(doc):
    found, _ = quotes((ROOT / doc).read_text())
    missing = []
    for sources, lines, lineno in found:
        checks = [source_check(s) for s in sources]
        for offset, line in enumerate(lines):
            for value, decimals, unit in numbers_in(line):
                if not any(c(value, decimals, unit) for c in checks):
                    missing.append(
                        f"{doc}:{lineno + offset}: {value:.{decimals}f}{unit.strip()} not in {', '.join(sources)}"
                    )
    assert not missing, "\n".join(missing)


def speeds(bare: list):
    """The lines of `bare` that state a speed: a number followed by tok/s or GB/s, or a row of a table whose header
    names one."""
    out, header = [], None
    for n, line in bare:
        text = re.sub(r"`[^`]*`", "", line)
        if not line.lstrip().startswith("|"):
            header = None
        elif header is None:
            header = line
        if line.lstrip().startswith("|---"):
            continue
        in_speed_table = header is not None and header is not line and SPEED_COLUMN.search(header)
        if SPEED.search(text) or (in_speed_table and numbers_in(line)):
            out.append((n, line))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_speed_sits_in_a_quote(doc):
    _, bare = quotes((ROOT / doc).read_text())
    unquoted = [f"{doc}:{n}: {line.strip()[:100]}" for n, line in speeds(bare)]
    assert not unquoted, (
        "a measured speed needs a <!-- figures: ... --> marker naming its run:\n" + "\n".join(unquoted)
    )


def test_the_check_catches_a_figure_that_is_not_in_its_source(tmp_path):
    found, bare = quotes(
        "intro 5 tok/s\n<!-- figures: x.json -->\n| a | 9.4 tok/s | 27% | 821 MiB |\n\nafter"
    )
    assert found == [(["x.json"], ["| a | 9.4 tok/s | 27% | 821 MiB |"], 3)] and bare[0][1] == "intro 5 tok/s"
    assert numbers_in("| a | 9.4 tok/s | 27% | 821 MiB | 1,565 s | int8 | 8x22B | 2026-12-03 |") == [
        (9.4, 1, " "),
        (27.0, 0, "%"),
        (821.0, 0, "MiB"),
        (1565.0, 0, " "),
    ]
    results = tmp_path / "r.json"
    results.write_text(
        json.dumps({"rows": [{"tok": 9.43, "eff": 0.271, "bytes": 821 * 2**20}], "note": "1.46x"})
    )
    check = source_check(str(results))
    assert check(9.4, 1, " ") and check(27, 0, "%") and check(821, 0, "MiB") and check(1.46, 2, "x")
    assert not check(9.5, 1, " ") and not check(28, 0, "%")
    table = "| | decode tok/s | share |\n|---|---|---|\n| blog | 9.3 | 27% |\n\nit reads 29.8 GB/s; tok/s is a unit"
    assert [n for n, _ in speeds(quotes(table)[1])] == [3, 5]
    twin = tmp_path / "r.md"
    twin.write_text("- int8 weights: 12.5 tok/s = 1.29x the blog's path\n")
    check = source_check(str(twin))
    assert check(1.29, 2, "x") and check(12.5, 1, " ") and not check(1.3, 1, "x")


def test_notebook_prose_states_no_measured_speed():
    """In a notebook, a measured speed changes with the machine: code prints it, markdown does not state it
    (datasheet rates, in TB/s, and hardware counts such as 8x MI300X are not measurements)."""
    measured = re.compile(r"\d[\d.,]*\s*(?:tok/s|tokens/s|GB/s|microseconds)")
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] == "markdown":
                prose = re.sub(r"`[^`]*`", " ", "".join(cell["source"]))
                found += [f"{path.name} cell {i}: {m.group(0)}" for m in measured.finditer(prose)]
    assert not found, "print measured speeds from code:\n" + "\n".join(found)
