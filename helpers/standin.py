"""The stand-in's folder, checked on every use: SmolLM2-135M-Instruct sparse-upcycled into a real
MixtralForCausalLM (workshop/standin_build.py builds it, and says how). When the folder is missing or
damaged, `ensure_standin` builds it in a process of its own (`python -m workshop build-standin`),
under a lock, and shows that process's progress here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
from pathlib import Path

from .files import cache_root, run_shown

RECIPE_VERSION = 1  # bump when the build changes; old caches are then rebuilt
MANIFEST = "standin.json"


class StandInError(RuntimeError):
    """The stand-in cannot be built or used here; the message says why and what to do."""


def standin_dir() -> Path:
    return cache_root() / f"standin-v{RECIPE_VERSION}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_cache(path: Path, full: bool = False) -> str | None:
    """Return None if `path` holds a complete stand-in, else what is wrong with it.

    The quick check reads the manifest, the file sizes and the safetensors headers;
    `full=True` also re-hashes every file (a few seconds for 2.8 GB)."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"no {MANIFEST} in {path}"
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if manifest.get("recipe_version") != RECIPE_VERSION:
        return f"built by recipe {manifest.get('recipe_version')}, current is {RECIPE_VERSION}"
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {info['bytes']}"
        if name.endswith(".safetensors"):
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    json.loads(f.read(n))
            except (ValueError, OSError) as exc:
                return f"{name} has a broken header: {exc}"
        if full and sha256(file) != info["sha256"]:
            return f"{name} does not match its checksum"
    if not manifest.get("files"):
        return "manifest lists no files"
    return None


def say(msg: str) -> None:
    print(f"[stand-in] {msg}", file=sys.stderr, flush=True)


def build(path: Path) -> Path:
    """Build the stand-in into `path` in a child process (the builder is tooling, not the package), its
    progress shown here; a StandInError if it fails (the folder is then left as it was)."""
    status, said = run_shown([sys.executable, "-m", "workshop", "build-standin", str(path)], sys.stderr)
    if status != 0:
        raise StandInError(f"building the stand-in failed (exit {status}): {said.strip()}")
    return path


def ensure_standin(full_check: bool = False) -> Path:
    """The stand-in's folder, building it (or rebuilding a broken one) when needed.

    A lock file keeps two processes from building at once; folders left by a build that was
    killed (`.*.building-*`) are removed before a new build starts. Taught in 00_setup."""
    path = standin_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            problem = check_cache(path, full=full_check)
            if problem is None:
                return path
            say(f"the cached stand-in is unusable ({problem}); rebuilding it")
        for stale in path.parent.glob(".*.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return build(path)
