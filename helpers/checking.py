"""Check the answers instead of calling them "accurate" by eye.

- code: extract the function from the answer and test it against an edit-distance suite, in a
  separate, limited Python process (never in the notebook's own process);
- translation: chrF against a public-domain English translation;
- jokes: distinct-n and duplicates across several samples.
"""
from __future__ import annotations

import ast
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

# ---------------------------------------------------------------- extraction

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


# ---------------------------------------------------------------- the sandbox

RUNNER = r'''
import ast, json, os, sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "os.kill", "os.killpg", "socket.connect", "socket.bind", "ctypes.dlopen", "ctypes.dlsym"}


def main():
    spec = json.loads(open("spec.json").read())
    results = os.fdopen(spec["fd"], "w")
    root = os.path.realpath(".")

    def inside(path):
        full = os.path.realpath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def guard(event, args):
        if event in BLOCKED:
            raise PermissionError(f"blocked by the sandbox: {event}")
        if event == "import" and args[0] in ("_posixsubprocess", "_ctypes", "ctypes"):  # unaudited forks, raw calls
            raise PermissionError(f"blocked by the sandbox: import {args[0]}")
        if event == "open" and isinstance(args[0], (str, bytes)):
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"blocked by the sandbox: writing {os.fsdecode(path)}")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.chmod", "os.symlink", "os.mkdir") and \
                args and isinstance(args[0], (str, bytes)) and not inside(args[0]):
            raise PermissionError(f"blocked by the sandbox: {event} {os.fsdecode(args[0])}")

    def report(status, detail="", cases=()):
        results.write(json.dumps({"status": status, "detail": detail, "cases": list(cases)}))
        results.close()

    source = open("candidate.py", encoding="utf-8").read()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        return report("no function found", f"not valid Python: {exc}")

    def takes_two(f):
        return isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
            len([a for a in f.args.args if a.arg != "self"]) == 2
    found = [(None, f.name) for f in tree.body if takes_two(f)]
    found += [(c.name, f.name) for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body if takes_two(f)]
    if not found:
        return report("no function found", "no function of two arguments in the code")
    preferred = [item for item in found if item[1] in spec["names"]]
    owner, name = (preferred or found)[-1]
    sys.addaudithook(guard)  # from here on, the guard cannot be removed
    namespace = {"__name__": "candidate"}
    try:
        exec(compile(tree, "candidate.py", "exec"), namespace)
        function = getattr(namespace[owner](), name) if owner else namespace[name]
        cases = []
        for a, b, expected in spec["cases"]:
            got = function(a, b)
            cases.append([a, b, expected, got if isinstance(got, (int, float, str, type(None))) else repr(got)])
    except MemoryError:
        return report("killed by a limit", "memory limit reached (MemoryError)")
    except OSError as exc:
        if exc.errno == 27:  # EFBIG: the file size limit
            return report("killed by a limit", "file size limit reached")
        return report("exception", f"{type(exc).__name__}: {exc}")
    except BaseException as exc:
        return report("exception", f"{type(exc).__name__}: {exc}")
    label = f"{owner}().{name}" if owner else name
    passed = all(got == expected for _, _, expected, got in cases)
    report("passed" if passed else "wrong answer", f"tested {label}", cases)


main()
'''

STATUSES = ("passed", "wrong answer", "exception", "timeout", "killed by a limit", "no function found")


@dataclass
class SandboxResult:
    status: str                 # one of STATUSES
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
    cases = edit_distance_cases() if cases is None else cases
    if code is None or not code.strip():
        return SandboxResult("no function found", "the answer contains no code")
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-"))
    python, nobody = _sandbox_python()
    started = time.perf_counter()
    try:
        (workdir / "candidate.py").write_text(code, encoding="utf-8")
        read_end, write_end = os.pipe()  # the result channel, apart from what the code prints
        (workdir / "spec.json").write_text(json.dumps({"cases": cases, "names": list(names), "fd": write_end}))
        (workdir / "runner.py").write_text(RUNNER)
        if nobody is not None:
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, nobody, nobody)
        proc = subprocess.Popen(
            [python, "-I", "runner.py"], cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_end,),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)},
            start_new_session=True, preexec_fn=_limits(cpu_s, memory_mb, file_mb, nobody))
        os.close(write_end)
        output, flooded = _capped_reader(proc, output_kib << 10)
        result_chunks: list[bytes] = []

        def read_result():
            while chunk := os.read(read_end, 1 << 16):
                if sum(map(len, result_chunks)) < 1 << 20:
                    result_chunks.append(chunk)
        result_reader = threading.Thread(target=read_result, daemon=True)
        result_reader.start()
        result = None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result = SandboxResult("timeout", f"still running after {timeout_s:.0f} s: stopped")
        finally:
            _kill_group(proc)
            proc.wait()
        result_reader.join(timeout=2)
        os.close(read_end)
        text = output()
        if result is None and flooded():
            result = SandboxResult("killed by a limit", f"printed more than {output_kib} KiB")
        if result is None:
            raw = b"".join(result_chunks).decode("utf-8", "replace")
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = {"status": "exception", "detail": "the result was garbled", "cases": []}
            if data:
                result = SandboxResult(data["status"], data["detail"], data["cases"])
            elif proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
                          "SIGKILL": "killed", "SIGSEGV": "crashed"}.get(name, name)
                result = SandboxResult("killed by a limit", f"{reason} ({name})")
            else:
                result = SandboxResult("exception", f"the process ended (exit {proc.returncode}) without a result")
        result.output, result.seconds = text, time.perf_counter() - started
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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


def _capped_reader(proc, cap: int):
    """Read the child's output on a thread, keeping the first `cap` bytes; past the cap, kill it."""
    kept, state = bytearray(), {"flooded": False}

    def pump():
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
            if not chunk:
                return
            room = cap - len(kept)
            kept.extend(chunk[:max(room, 0)])
            if len(chunk) > room:
                state["flooded"] = True
                _kill_group(proc)
                return
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def output():
        thread.join(timeout=2)
        return kept.decode("utf-8", "replace")
    return output, lambda: state["flooded"]


# ---------------------------------------------------------------- translation

# Henry Wadsworth Longfellow's translation of Inferno I, 1-3 (1867; public domain).
LONGFELLOW = ("Midway upon the journey of our life I found myself within a forest dark, "
              "For the straightforward pathway had been lost.")
# The blog's published answer (published output of Mixtral 8x22B, ROCm blog, May 2024).
BLOG_TRANSLATION = ("In the middle of the journey of our life, I found myself in a dark wood, "
                    "for the straight way was lost.")


def chrf(hypothesis: str, reference: str = LONGFELLOW) -> float:
    """chrF (character n-gram F-score, 0-100) of one translation against one reference."""
    import sacrebleu
    if not isinstance(hypothesis, str):
        raise TypeError(f"chrF scores text, got {type(hypothesis).__name__}")
    return sacrebleu.sentence_chrf(" ".join(hypothesis.split()), [" ".join(reference.split())]).score


# ---------------------------------------------------------------- diversity

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
