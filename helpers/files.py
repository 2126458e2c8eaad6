"""Where the package keeps what it builds, writing it so that a failure leaves nothing half-written, and running
the tooling beside it (the stand-in's builder, the benchmark) in a child process, its output shown here."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .data import CACHE_ENV

ROOT = Path(__file__).resolve().parent.parent  # the repository: helpers/ and the tooling beside it


def cache_root() -> Path:
    """Where the stand-in and the tokenizers are kept: $MIXTRAL_NOTEBOOKS_CACHE, else ~/.cache/mixtral-notebooks."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mixtral-notebooks"


def weight_files(folder) -> list[str]:
    """A model folder's safetensors: the shards its index names (present or not), else all *.safetensors."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [f.name for f in sorted(Path(folder).glob("*.safetensors"))]


def atomic_file(path, write) -> Path:
    """Write a file through `write(temporary path)`, then rename it into place: the file is either
    the old one or the whole new one, even if the writer fails or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_folder(path):
    """Fill a fresh folder beside `path` (yielded); when the block ends without an error it replaces
    `path`, else it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        yield work
        work.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        work.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def run_shown(command: list, stream) -> tuple[int, str]:
    """Run `command` from the repository root in a child process, its output (stdout and stderr) written to
    `stream` as it comes, progress bars' carriage returns included: (exit status, the last 400 characters).
    preexec_fn makes Python fork rather than vfork: a vfork'd child starts its recorded peak memory at this
    process's peak so far, a forked one at its memory now (what `make notebooks` records as subprocesses')."""
    child = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=lambda: None
    )
    decode, said = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    while chunk := child.stdout.read1(4096):
        text = decode.decode(chunk)
        said = (said + text)[-400:]
        stream.write(text)
        stream.flush()
    return child.wait(), said
