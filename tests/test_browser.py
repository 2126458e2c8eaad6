"""A real browser: JupyterLab on loopback, Debian's Chromium driven by Playwright (workshop/browser.py).

Opens 02_poem, runs it, moves the temperature slider, presses Generate, and checks that text
streams into the panel. Skipped, with the reason, where Chromium or Playwright is missing; in CI a
missing one is a failure."""

import importlib.util
import os
import time
from pathlib import Path

import pytest

from workshop.browser import CHROMIUM, ROOT, chromium_page, jupyter_lab, run_all_cells

SCREENSHOT = ROOT / "build" / "browser-02_poem.png"

# CI installs both (.ci/run), so there a missing one is a broken install, not a reason to skip.
MISSING = [
    why
    for why, gone in (
        (
            "Chromium is not installed (apt-get install chromium; .ci/run does this)",
            not Path(CHROMIUM).exists(),
        ),
        (
            "Playwright is not installed (pip install -r requirements.txt)",
            importlib.util.find_spec("playwright") is None,
        ),
    )
    if gone
]
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"the browser test cannot run in CI: {'; '.join(MISSING)}")
if MISSING:
    pytest.skip(f"browser test skipped: {'; '.join(MISSING)}", allow_module_level=True)


BUDGET = 64  # new tokens, for the blog's cell and the panel: enough to stream, press Stop and read the stats


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 over a copy of 02_poem whose token budget is BUDGET, not the blog's 512: this
    test is about the panel in a browser; nbval runs the notebook as written."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "02_poem.ipynb", as_version=4)
    budget = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("max_new_tokens = 512\n")]
    assert len(budget) == 1, "02_poem sets its budget in one cell that starts `max_new_tokens = 512`"
    budget[0].source = budget[0].source.replace("max_new_tokens = 512", f"max_new_tokens = {BUDGET}", 1)
    copy = tmp_path_factory.mktemp("browser") / "02_poem.ipynb"
    nbformat.write(nb, copy)
    with jupyter_lab([copy]) as url:
        yield url


def test_panel_streams_text_in_a_real_browser(lab):
    SCREENSHOT.parent.mkdir(exist_ok=True)
    with chromium_page() as page:
        try:
            run_all_cells(page, lab, "02_poem")
            # the panel appears in an output area once its cell has run (the blog's cell runs first)
            panel = page.locator(".jp-OutputArea-output .sampling-panel")
            panel.wait_for(timeout=240_000)
            slider = panel.locator(".widget-slider").first
            assert "temperature" in slider.inner_text()
            readout = slider.locator(".widget-readout")
            assert readout.inner_text().strip() == "0.80"
            # one step: ipywidgets holds back a slider's further updates while the kernel is busy with the first,
            # and a button's click is sent at once, so after several steps the click could reach the kernel first
            slider.locator(".noUi-handle").click()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(
                """() => document.querySelector(
                '.jp-OutputArea-output .sampling-panel .widget-slider .widget-readout').textContent.trim() === '0.75'""",
                timeout=10_000,
            )
            panel.locator("button.jupyter-button", has_text="Generate").click()
            output = panel.locator(".sampling-panel-output textarea")
            deadline = time.time() + 120
            while len(output.input_value()) < 20 and time.time() < deadline:
                time.sleep(0.5)
            streamed = output.input_value()
            assert len(streamed) >= 20, "no text streamed into the panel"
            panel.locator("button.jupyter-button", has_text="Stop").click()
            stats = panel.locator(".widget-html", has_text="tok/s")
            stats.first.wait_for(timeout=60_000)
            assert "temperature=0.75" in stats.first.inner_text()
        finally:
            page.screenshot(path=str(SCREENSHOT), full_page=False)
