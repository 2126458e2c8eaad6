"""Check the answers instead of calling them "accurate" by eye.

- code: extract the function from the answer and test it against an edit-distance suite, in a
  separate, limited Python process (never in the notebook's own process);
- translation: chrF against a public-domain English translation;
- jokes: distinct-n and duplicates across several samples.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import LONGFELLOW

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str) -> str | None:
    """The Python code in a model's answer: fenced blocks (python first), else an unfenced
    `def` with its indented body. None if there is no code."""
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(answer)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if lang == ""]
    chosen = python or untagged
    if chosen:
        return "\n\n".join(b.strip("\n") for b in chosen) + "\n"
    if blocks:  # only blocks tagged as another language
        return None
    lines, code, inside = answer.splitlines(), [], False
    for line in lines:
        if re.match(r"(def|class|import|from)\s", line):
            inside = True
        elif inside and line.strip() and not line.startswith((" ", "\t")):
            inside = False
        if inside:
            code.append(line)
    return "\n".join(code).strip("\n") + "\n" if code else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, replace), the package's own reference: one row of
    the dynamic-programming table at a time."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_distance_cases(random_pairs: int = 20, seed: int = 0) -> list[tuple[str, str, int]]:
    """The classic cases plus seeded random pairs, each with the reference answer."""
    classic = [("horse", "ros"), ("intention", "execution"), ("", ""), ("", "abc"), ("abc", ""),
               ("same", "same"), ("kitten", "sitting"), ("flaw", "lawn"), ("a", "b"),
               ("café", "cafe"), ("naïve", "naive"), ("日本語", "日本"), ("🙂🙃", "🙃🙂")]
    rng = random.Random(seed)
    letters = "abcde"
    pairs = classic + [("".join(rng.choices(letters, k=rng.randint(0, 8))),
                        "".join(rng.choices(letters, k=rng.randint(0, 8)))) for _ in range(random_pairs)]
    return [(a, b, edit_distance(a, b)) for a, b in pairs]


CHILD = Path(__file__).with_name("sandbox_child.py")  # run as a program in the child, never imported


@dataclass
class SandboxResult:
    status: str  # passed, wrong answer, exception, timeout, killed by a limit, no function found
    detail: str = ""
    cases: list = field(default_factory=list)   # [a, b, expected, got]
    output: str = ""            # what the code printed (capped)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(got == expected for _, _, expected, got in self.cases)

    def table(self) -> str:
        if not self.cases:
            return "(no test case ran)"
        rows = [f"{'word1':<12} {'word2':<12} {'expected':>8} {'got':>8}  result"]
        for a, b, expected, got in self.cases:
            rows.append(f"{a!r:<12} {b!r:<12} {expected!r:>8} {got!r:>8}  {'pass' if got == expected else 'FAIL'}")
        return "\n".join(rows)

    def verdict(self) -> str:
        if self.status == "passed":
            return f"PASSED: all {len(self.cases)} cases correct."
        if self.status == "wrong answer":
            return f"WRONG ANSWER: {self.passed} of {len(self.cases)} cases correct."
        return f"{self.status.upper()}: {self.detail}"


def _limits(cpu_s: int, memory_mb: int, file_mb: int, drop_to_uid: int | None):
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (not enforced for root...)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to_uid is not None:  # ...so a root caller's sandbox runs as nobody
            os.setgroups([])
            os.setgid(drop_to_uid)
            os.setuid(drop_to_uid)
    return apply


def run_sandboxed(code: str, cases=None, names=("minDistance", "min_distance", "edit_distance"),
                  timeout_s: float = 10.0, cpu_s: int = 10, memory_mb: int = 512, file_mb: int = 1,
                  output_kib: int = 64) -> SandboxResult:
    """Run `code`'s two-argument function on `cases` in a separate, limited Python process.

    The child: `python -I` (no user site, no PYTHON* variables), a fresh temporary directory,
    an environment with nothing inherited, limits on CPU time, memory, file size and processes,
    an audit hook that refuses process creation, sockets, ctypes and writes outside its
    directory, a wall-clock timeout that kills its whole process group, and output capped at
    `output_kib`. As root it runs as the user nobody."""
    if sys.platform != "linux":
        raise OSError(f"run_sandboxed runs model code on Linux only (this is {sys.platform}): its limits on memory, "
                      f"processes and CPU time are verified there alone. Use Linux or WSL 2 (README, Platforms).")
    cases = edit_distance_cases() if cases is None else cases
    if code is None or not code.strip():
        return SandboxResult("no function found", "the answer contains no code")
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-"))
    started = time.perf_counter()
    try:
        proc, read_end = _start_child(workdir, code, {"cases": cases, "names": list(names)}, cpu_s, memory_mb, file_mb)
        output, flooded = _reader(lambda: proc.stdout.read1(1 << 16), output_kib << 10, lambda: _kill_group(proc))
        raw, _ = _reader(lambda: os.read(read_end, 1 << 16), 1 << 20)
        result = None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result = SandboxResult("timeout", f"still running after {timeout_s:.0f} s: stopped")
        finally:
            _kill_group(proc)
            proc.wait()
        if result is None and flooded():
            result = SandboxResult("killed by a limit", f"printed more than {output_kib} KiB")
        result = result or _child_result(raw(), proc.returncode)
        os.close(read_end)
        result.output, result.seconds = output(), time.perf_counter() - started
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _start_child(workdir: Path, code: str, spec: dict, cpu_s: int, memory_mb: int, file_mb: int):
    """The child program, the candidate and its spec in `workdir`, started under the limits:
    (process, read end of the pipe it writes its one JSON result to)."""
    python, nobody = _sandbox_python()
    (workdir / "candidate.py").write_text(code, encoding="utf-8")
    read_end, write_end = os.pipe()  # the result channel, apart from what the code prints
    (workdir / "spec.json").write_text(json.dumps(dict(spec, fd=write_end)))
    shutil.copyfile(CHILD, workdir / "runner.py")
    if nobody is not None:
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, nobody, nobody)
    proc = subprocess.Popen(
        [python, "-I", "runner.py"], cwd=workdir, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_end,),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)},
        start_new_session=True, preexec_fn=_limits(cpu_s, memory_mb, file_mb, nobody))
    os.close(write_end)
    return proc, read_end


def _child_result(raw: str, returncode: int) -> SandboxResult:
    """The child's own JSON report, or, without one, what ended it."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = {"status": "exception", "detail": "the result was garbled", "cases": []}
    if data:
        return SandboxResult(data["status"], data["detail"], data["cases"])
    if returncode < 0:
        name = signal.Signals(-returncode).name
        reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
                  "SIGKILL": "killed", "SIGSEGV": "crashed"}.get(name, name)
        return SandboxResult("killed by a limit", f"{reason} ({name})")
    return SandboxResult("exception", f"the process ended (exit {returncode}) without a result")


def _world_executable(path: str) -> bool:
    """Can any user run `path`? (Every folder above it searchable, the file executable by others.)"""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in real.parents) and bool(os.stat(real).st_mode & 0o001)


def _sandbox_python() -> tuple[str, int | None]:
    """The interpreter and user for the child. As root, the child runs as nobody (root ignores
    the process limit), with a Python that nobody may run; as anyone else, as that user."""
    if os.geteuid() != 0:
        return sys.executable, None
    for candidate in (sys.executable, sys._base_executable, "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return candidate, 65534
    raise RuntimeError("running as root, the sandbox needs a Python that the user nobody may run "
                       "(for example /usr/bin/python3); none was found")


def _kill_group(proc) -> None:
    """SIGKILL the child and everything it started (it runs in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reader(read, cap: int, on_overflow=None):
    """Drain a stream on a thread with `read()` (a chunk, b"" at its end), keeping the first `cap`
    bytes; past the cap call `on_overflow()` and stop. -> (text(): waits, then decodes; overflowed())."""
    kept, state = bytearray(), {"overflow": False}

    def pump():
        while chunk := read():
            room = cap - len(kept)
            kept.extend(chunk[:max(room, 0)])
            if len(chunk) > room and on_overflow:
                state["overflow"] = True
                return on_overflow()
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def text() -> str:
        thread.join(timeout=2)
        return kept.decode("utf-8", "replace")
    return text, lambda: state["overflow"]


def chrf(hypothesis: str, reference: str = LONGFELLOW) -> float:
    """chrF (character n-gram F-score, 0-100) of one translation against one reference."""
    import sacrebleu
    if not isinstance(hypothesis, str):
        raise TypeError(f"chrF scores text, got {type(hypothesis).__name__}")
    return sacrebleu.sentence_chrf(" ".join(hypothesis.split()), [" ".join(reference.split())]).score


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over `texts` (1.0: nothing repeats; near 0: one phrase again and again)."""
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def duplicate_lines(texts: list[str]) -> int:
    """How many non-empty lines (jokes, mostly) appear more than once across `texts`, counted per extra copy."""
    lines = [" ".join(line.lower().split()) for t in texts for line in t.splitlines() if line.strip()]
    return len(lines) - len(set(lines))


def diversity(texts: list[str]) -> dict:
    return {"samples": len(texts), "distinct-1": distinct_n(texts, 1), "distinct-2": distinct_n(texts, 2),
            "distinct-3": distinct_n(texts, 3), "duplicate lines": duplicate_lines(texts)}
