"""Run the notebooks headless, in order: executed copies and HTML into build/, answers printed.

`python -m workshop walkthrough` runs the blog's walkthrough (00-05) and is what `make run` calls;
`--all` runs every notebook (`make run-all`), names pick some; `--inplace` stores the outputs back
into notebooks/ (what `make notebooks` calls, before a commit); `--build=DIR` writes the executed
copies into DIR instead of build/ (the tests run the walkthrough on other models there)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
ANSWER_TAG = "task-output"  # cells whose printed output is the task's answer
# The blog's own walkthrough: setup, loading and its four tasks. Ours (06 on) run with --all.
BLOG_WALKTHROUGH = ("00_setup", "01_loading", "02_poem", "03_code", "04_jokes", "05_translation")


# Appended to each run, then removed: the kernel's peak memory, and its subprocesses' (servers, benchmarks).
PEAK_CELL = (
    "import resource as _r\n"
    "print(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss, _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss)"
)
# The header's time, rewritten from the measured run by --inplace (tests/test_notebooks.py keeps it within 2x).
MEASURED = re.compile(
    r"about [\d,]+ (?:s|min) with the stand-in on a \d+-core CPU \(measured by `make notebooks`\)"
)


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _clean(nb) -> None:
    """Drop what changes on every run without meaning anything (timings, widget state), and
    join the many small stream outputs that a token streamer writes into one per stream."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        merged = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (
                out.output_type == "stream"
                and last is not None
                and last.output_type == "stream"
                and last.name == out.name
            ):
                last.text += out.text
            else:
                merged.append(out)
        if "outputs" in cell:
            cell.outputs = merged


def run_notebook(path: Path, inplace: bool = False, timeout: int = 1800, build: Path = BUILD):
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    from helpers.files import atomic_file

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    done = {"n": 0}
    started = time.perf_counter()

    def progress(cell, **_):
        if cell.cell_type == "code":
            done["n"] += 1
            print(
                f"\r    cell {done['n']}/{code_cells}  {time.perf_counter() - started:5.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    # Progress bars drawn headless would be stored as a frozen "0%": switch them off here only.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no transport notice per notebook
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_execute=progress,
    )
    try:
        client.execute()
        printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
        peaks = [
            int(k) // 1024 for k in printed.split()
        ]  # KiB -> MiB; a busy kernel may send them in two pieces
        stamp(nb, time.perf_counter() - started, *peaks)
    finally:
        print(file=sys.stderr)
        nb.cells.pop()
        _clean(nb)
        atomic_file(build / path.name, lambda tmp: nbformat.write(nb, str(tmp)))
        html, _ = HTMLExporter().from_notebook_node(nb)
        atomic_file(build / path.with_suffix(".html").name, lambda tmp: tmp.write_text(html))
    if inplace:  # a committed notebook is the old one or the whole new one, never half-written
        atomic_file(path, lambda tmp: nbformat.write(nb, str(tmp)))
    return nb


def stamp(nb, seconds: float, kernel_mib: int, subprocess_mib: int) -> None:
    """Record a run in the notebook's metadata, and put its time in the header's "about N s" phrase."""
    cores = os.cpu_count()
    nb.metadata["measured"] = dict(
        seconds=round(seconds),
        kernel_peak_mib=kernel_mib,
        subprocess_peak_mib=subprocess_mib,
        cpu_cores=cores,
    )
    about = (
        f"about {max(5, round(seconds / 5) * 5)} s" if seconds < 90 else f"about {round(seconds / 60)} min"
    )
    nb.cells[0].source = MEASURED.sub(
        f"{about} with the stand-in on a {cores}-core CPU (measured by `make notebooks`)", nb.cells[0].source
    )


def answers(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        if ANSWER_TAG in cell.get("metadata", {}).get("tags", []):
            texts.append(
                "".join(
                    o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                )
            )
    return texts


def selected(argv: list[str]) -> list[Path]:
    """The notebooks a command line asks for: names (parts of file names), else --all, else 00-05."""
    only = [a for a in argv if not a.startswith("--")] or ([] if "--all" in argv else list(BLOG_WALKTHROUGH))
    paths = [p for p in notebook_paths() if not only or any(o in p.name for o in only)]
    if not paths:
        raise ValueError(
            f"no notebook matches {' '.join(only)!r}: name parts of "
            f"{', '.join(p.stem for p in notebook_paths())}, or use --all"
        )
    return paths


def build_folder(argv: list[str]) -> Path:
    """Where the executed copies go: the last --build=DIR, else build/."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("--build=")]
    return Path(chosen[-1]).expanduser().resolve() if chosen else BUILD


USAGE = """usage: python -m workshop walkthrough [--all] [--inplace] [--build=DIR] [names]

Execute notebooks headless, in order, into build/ (or DIR) as .ipynb and .html, and print each task's answer.
  names       parts of notebook file names (08_ or performance); none: the blog's walkthrough, 00-05
  --all       every notebook
  --inplace   also store the outputs, time and peak memory in notebooks/ (make notebooks)"""


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    unknown = [
        a
        for a in argv
        if a.startswith("-") and a not in ("--all", "--inplace") and not a.startswith("--build=")
    ]
    if unknown:
        print(f"walkthrough: unknown option {' '.join(unknown)}\n{USAGE}", file=sys.stderr)
        return 2
    inplace, build = "--inplace" in argv, build_folder(argv)
    try:
        paths = selected(argv)
    except ValueError as exc:
        print(f"walkthrough: {exc}", file=sys.stderr)
        return 2
    from helpers.fastpath import fast_recipe
    from helpers.loading import pick_dtype

    print(
        f"the notebooks load models with the {fast_recipe(*pick_dtype())}\n(load_pipeline(fast=False) is the blog's plain "
        f"call; 08_performance measures both)",
        file=sys.stderr,
        flush=True,
    )
    total = time.perf_counter()
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            nb = run_notebook(path, inplace=inplace, build=build)
        except Exception as exc:  # noqa: BLE001 - report which notebook failed, keep its partial copy
            print(
                f"    FAILED after {time.perf_counter() - t:.0f} s: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}\n"
                f"    the partly executed notebook is in {build / path.name}",
                file=sys.stderr,
            )
            return 1
        print(
            f"    done in {time.perf_counter() - t:.0f} s -> {build / path.stem}.ipynb, .html",
            file=sys.stderr,
        )
        for text in answers(nb):
            print(f"\n===== {path.stem} =====\n{text.rstrip()}\n", flush=True)
    print(
        f"walkthrough finished in {time.perf_counter() - total:.0f} s; open {build}/*.html", file=sys.stderr
    )
    return 0
