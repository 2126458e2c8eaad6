"""JupyterLab on loopback and Debian's Chromium driven by Playwright: the browser test's machinery,
and `python -m workshop screenshots` (`make screenshots`), which photographs each notebook's widget
after a run so that readers without a kernel (GitHub, nbviewer, build/*.html) see the panels too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers.files import atomic_file
from helpers.serving import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
IMAGES = ROOT / "docs" / "images"
# The widget each notebook shows, and what to do before the photograph.
WIDGETS = {
    "02_poem": "panel",
    "03_code": "panel",
    "04_jokes": "panel",
    "05_translation": "panel",
    "06_sampling_lab": "explorer",
}
SHOT_TAG = "widget-screenshot"  # the markdown cell after a widget cell that shows its photograph


@contextlib.contextmanager
def jupyter_lab(notebooks: list[Path]):
    """JupyterLab on 127.0.0.1, no token, over copies of `notebooks` (the originals are never touched);
    yields its URL."""
    with tempfile.TemporaryDirectory(prefix="lab-") as scratch:
        root = Path(scratch)
        for path in notebooks:
            shutil.copy(path, root / path.name)
        settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        port = free_port()
        env = dict(
            os.environ,
            JUPYTERLAB_SETTINGS_DIR=str(root / ".settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"),
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                f"--ServerApp.root_dir={root}",
                "--LabApp.expose_app_in_browser=True",
            ],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "lab.log", "w"),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError(
                            f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}"
                        )
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A Playwright page in Debian's Chromium (Playwright downloads no browser here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def run_all_cells(page, url: str, name: str) -> None:
    """Open notebook `name` in the lab at `url`, wait for its kernel, and run every cell."""
    page.goto(f"{url}/lab/workspaces/{name}/tree/{name}.ipynb?reset")  # a workspace of its own: one tab open
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook", timeout=60_000)
    page.wait_for_function(
        """() => {
        const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return k && k.status === 'idle';
    }""",
        timeout=60_000,
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")


def photograph(page, url: str, name: str, out: Path, seconds: float = 12) -> Path:
    """Run notebook `name`, then photograph its widget: a sampling panel after Generate has run for
    `seconds` and been stopped, or finished by itself (its stats line and history showing), or the
    distribution explorer."""
    run_all_cells(page, url, name)
    if WIDGETS[name] == "panel":
        widget = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .sampling-panel")
        widget.wait_for(timeout=600_000)
        widget.locator("button.jupyter-button", has_text="Generate").click()
        time.sleep(seconds)
        stop = widget.locator("button.jupyter-button", has_text="Stop")
        if stop.is_enabled():  # a short answer may have finished by itself
            with contextlib.suppress(Exception):
                stop.click(timeout=3_000)
        widget.locator(".widget-html", has_text="tok/s").first.wait_for(timeout=120_000)
    else:
        widget = page.locator(
            ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .widget-vbox",
            has=page.locator(".widget-slider"),
        ).first
        widget.locator("img, svg, canvas").first.wait_for(timeout=600_000)
    widget.scroll_into_view_if_needed()
    time.sleep(1)  # let the last redraw land
    out.parent.mkdir(parents=True, exist_ok=True)
    widget.screenshot(path=str(out), type="png")
    return out


def screenshots(names: list[str] | None = None) -> list[Path]:
    """Photograph each widget notebook's widget into docs/images/widget-<notebook>.png."""
    names = names or list(WIDGETS)
    unknown = [n for n in names if n not in WIDGETS]
    if unknown:
        raise ValueError(f"no widget to photograph in {', '.join(unknown)}: use {', '.join(WIDGETS)}")
    if not Path(CHROMIUM).exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: apt-get install chromium (the screenshots need a browser)"
        )
    taken = []
    with jupyter_lab([ROOT / "notebooks" / f"{n}.ipynb" for n in names]) as url, chromium_page() as page:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            final = IMAGES / f"widget-{name}.png"
            atomic_file(
                final, lambda tmp: photograph(page, url, name, tmp)
            )  # whole or absent, never half-written
            taken.append(final)
            page.evaluate(
                "() => window.jupyterapp.serviceManager.kernels.shutdownAll()"
            )  # one model at a time
    return taken
