"""Run a model's code, never in the notebook's own process: a separate Python whose limits the kernel
enforces (03_code teaches it, layer by layer).

The child (`sandbox_child.py`, a program of its own) asks the kernel, before it reads the candidate's
code, for a new network namespace (no interface but a loopback that is down), the drop from root to
`nobody`, no new privileges, a seccomp filter and Landlock (files writable only in its folder, no TCP,
signals and abstract unix sockets kept inside); then it installs an audit hook that allows only what a
pure function needs. Rlimits bound CPU time, memory, file size and processes, a wall clock stops it,
and its output is capped. `SandboxResult.protections` says what held on this machine.
"""

from __future__ import annotations

import json
import os
import resource  # here, not between fork and exec (the child's preexec function)
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checking import edit_distance_cases

CHILD = Path(__file__).with_name("sandbox_child.py")  # run as a program in the child, never imported
NOBODY = 65534
LAYERS = ("both", "kernel", "audit hook")  # run_sandboxed(layers=...): what guards the candidate
# What the child asks of the kernel (all of it unless layers="audit hook"); tests narrow it to stand for a
# kernel that lacks some.
_KERNEL = ("namespace", "landlock", "seccomp")
REPORTED = ("ran", "exception", "killed by a limit", "no function found", "refused")  # what the child may say
LANDLOCK_ABI = {2: "no rename or link out of it", 3: "no truncation outside it", 5: "no device ioctls"}


@dataclass(frozen=True)
class Protections:
    """What held in the sandbox's process, as it reported before it read the candidate's code."""

    landlock: int = 0  # Landlock ABI in force; 0: none
    namespace: bool = False  # a network namespace of its own: no interface but a loopback that is down
    seccomp: str = ""  # what the seccomp filter refuses; "": no filter
    no_new_privs: bool = False
    uid: int = -1
    limits: dict = field(default_factory=dict)  # rlimit name -> soft limit (-1: none)
    audit_hook: bool = False
    missing: tuple = ()  # what the kernel refused, and why

    def lines(self) -> list[str]:
        if self.uid < 0:
            return ["(the sandbox reported nothing: it ended before it could)"]
        abi, lines = f"Landlock ABI {self.landlock}", []
        if self.landlock:
            lines.append(
                f"{abi}: files writable only in its folder, nothing executable"
                + "".join(f", {text}" for version, text in LANDLOCK_ABI.items() if self.landlock >= version)
            )
        if self.landlock >= 4:
            lines.append(f"{abi}: no TCP bind or connect")
        if self.landlock >= 6:
            lines.append(f"{abi}: signals and abstract unix sockets only within the sandbox")
        if self.namespace:
            lines.append("network namespace: no interface but a loopback that is down")
        if self.seccomp:
            lines.append(f"seccomp: refuses {self.seccomp}")
        lines += [f"missing: {reason}" for reason in self.missing]
        name = {0: "root", NOBODY: "nobody"}.get(self.uid, "an ordinary user")
        lines.append(f"user: {name} (uid {self.uid})" + (", no new privileges" if self.no_new_privs else ""))
        limits = self.limits
        lines.append(
            f"rlimits: CPU {limits['CPU']} s, memory {limits['AS'] >> 20} MiB, "
            f"files {limits['FSIZE'] >> 20} MiB, processes {limits['NPROC']}"
        )
        alone = self.audit_hook and not (self.landlock or self.namespace or self.seccomp)
        lines.append(
            "audit hook: "
            + ("deny by default" if self.audit_hook else "off")
            + (" (alone: the kernel's layers were not asked for)" if alone else "")
        )
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class SandboxResult:
    status: str  # passed, wrong answer, exception, timeout, killed by a limit, no function found
    detail: str = ""
    cases: list = field(default_factory=list)  # [a, b, expected, got]
    output: str = ""  # what the code printed (capped)
    seconds: float = 0.0
    protections: Protections = field(default_factory=Protections)
    refused: list = field(default_factory=list)  # what the audit hook refused, caught by the code or not

    @property
    def passed(self) -> int:
        return sum(got == expected for _, _, expected, got in self.cases)

    def table(self) -> str:
        if not self.cases:
            return "(no test case ran)"
        rows = [f"{'word1':<12} {'word2':<12} {'expected':>8} {'got':>8}  result"]
        for a, b, expected, got in self.cases:
            rows.append(
                f"{a!r:<12} {b!r:<12} {expected!r:>8} {got!r:>8}  {'pass' if got == expected else 'FAIL'}"
            )
        return "\n".join(rows)

    def verdict(self) -> str:
        if self.status == "passed":
            return f"PASSED: all {len(self.cases)} cases correct."
        if self.status == "wrong answer":
            return f"WRONG ANSWER: {self.passed} of {len(self.cases)} cases correct."
        return f"{self.status.upper()}: {self.detail}"


@dataclass(frozen=True)
class Limits:
    """What the sandboxed child may spend: wall-clock seconds (then its process group is killed), CPU seconds,
    address space, bytes written to one file, and output read back."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    file_mb: int = 1
    output_kib: int = 64


def _rlimits(limits: Limits):
    def apply():
        cpu, memory, file = limits.cpu_s, limits.memory_mb << 20, limits.file_mb << 20
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file, file))
        resource.setrlimit(
            resource.RLIMIT_NPROC, (0, 0)
        )  # no new processes (root ignores it: the child drops to nobody)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_sandboxed(
    code: str,
    cases=None,
    names=("minDistance", "min_distance", "edit_distance"),
    limits: Limits = Limits(),
    layers: str = "both",
) -> SandboxResult:
    """Run `code`'s two-argument function on `cases` in a separate, limited Python process (03_code).

    The child: `python -I -S`, a fresh temporary folder, an empty environment, rlimits on CPU time,
    memory, file size and processes, a wall-clock timeout that kills its whole process group, output
    capped (all of them `limits`); as root it runs as nobody. It gets the inputs only: the expected answers stay
    here, where what it returned is checked. `layers`: "both" (default) puts the kernel's layers
    (network namespace, seccomp, Landlock) and the deny-by-default audit hook in place; "kernel" leaves the
    hook out (to see what the kernel alone stops); "audit hook" runs with the hook alone, for a kernel that
    offers neither Landlock nor namespaces, where the other two refuse to run. The result's `protections`
    says what held."""
    if sys.platform != "linux":
        raise OSError(
            f"run_sandboxed runs model code on Linux only (this is {sys.platform}): its layers (Landlock, "
            f"namespaces, seccomp, rlimits) are Linux's. Use Linux or WSL 2 (README, Platforms)."
        )
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {', '.join(map(repr, LAYERS))}, not {layers!r}")
    cases = edit_distance_cases() if cases is None else cases
    if not all(isinstance(case, (tuple, list)) and len(case) == 3 for case in cases):
        raise ValueError(
            "cases are (word1, word2, expected distance) triples, as edit_distance_cases() makes them"
        )
    if code is None or not code.strip():
        return SandboxResult("no function found", "the answer contains no code")
    spec = {
        "inputs": [[a, b] for a, b, _ in cases],
        "names": list(names),
        "audit_hook": layers != "kernel",
        "kernel": list(_KERNEL) if layers != "audit hook" else [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-"))
    started = time.perf_counter()
    try:
        proc, read_end = _start_child(workdir, code, spec, limits)
        output, flooded = _reader(
            lambda: proc.stdout.read1(1 << 16), limits.output_kib << 10, lambda: _kill_group(proc)
        )
        raw, _ = _reader(lambda: os.read(read_end, 1 << 16), 1 << 20)
        result = None
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            result = SandboxResult("timeout", f"still running after {limits.timeout_s:.0f} s: stopped")
        finally:
            _kill_group(proc)
            proc.wait()
        if result is None and flooded():
            result = SandboxResult("killed by a limit", f"printed more than {limits.output_kib} KiB")
        held, report = _child_report(raw())
        result = result or _child_result(report, proc.returncode, cases)
        os.close(read_end)
        result.output, result.seconds, result.protections = output(), time.perf_counter() - started, held
        if result.status == "refused" and not (held.landlock or held.namespace):
            raise OSError(_NO_KERNEL.format(result.detail))
        if (
            result.status == "refused"
        ):  # the child says so only before the code runs, on a kernel without both
            result.status, result.detail = (
                "exception",
                "the result was garbled: a refusal the kernel did not make",
            )
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_NO_KERNEL = (
    "run_sandboxed did not run the code: this kernel offers neither Landlock nor a network namespace "
    "({}). Use Linux 5.13 or later with Landlock on (its name in the lsm= boot parameter), or allow "
    "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu "
    "kernel.apparmor_restrict_unprivileged_userns=0); or pass layers='audit hook' to run it with the "
    "audit hook alone, which code that finds a way around Python's hooks gets past."
)


def _start_child(workdir: Path, code: str, spec: dict, limits: Limits):
    """The child program, the candidate and its spec in `workdir`, started under the limits:
    (process, read end of the pipe it writes its report to)."""
    python, drop_to = _sandbox_python()
    (workdir / "candidate.py").write_text(code, encoding="utf-8")
    read_end, write_end = os.pipe()  # the report channel, apart from what the code prints
    (workdir / "spec.json").write_text(json.dumps(dict(spec, fd=write_end, drop_to=drop_to)))
    shutil.copyfile(CHILD, workdir / "runner.py")
    if drop_to is not None:  # the child leaves the network and then drops to nobody itself
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, drop_to, drop_to)
    proc = subprocess.Popen(
        [python, "-I", "-S", "-B", "runner.py"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(write_end,),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)},
        start_new_session=True,
        preexec_fn=_rlimits(limits),
    )
    os.close(write_end)
    return proc, read_end


def _child_report(raw: str) -> tuple[Protections, dict | None]:
    """The child's first line (what held, written before the candidate ran) and its last (the result)."""
    lines = raw.splitlines()
    try:
        held = json.loads(lines[0]) if lines else {}
        protections = Protections(
            held["landlock"],
            held["namespace"],
            held["seccomp"],
            held["no_new_privs"],
            held["uid"],
            held["limits"],
            held["audit_hook"],
            tuple(held["missing"]),
        )
    except (ValueError, KeyError, TypeError):
        protections = Protections()
    try:  # the code could have written to the pipe too: take nothing on trust
        report = json.loads(lines[-1]) if len(lines) > 1 else None
        if report is not None and not (
            isinstance(report, dict)
            and report.get("status") in REPORTED
            and isinstance(report.get("detail"), str)
            and isinstance(report.get("returned"), list)
            and isinstance(report.get("refused"), list)
        ):
            raise ValueError(report)
    except ValueError:
        report = {"status": "exception", "detail": "the result was garbled", "refused": []}
    return protections, report


def _child_result(data: dict | None, returncode: int, cases) -> SandboxResult:
    """The child's own result, checked here against the expected answers, or, without one, what ended it."""
    if data and data["status"] == "ran":
        returned = data["returned"]
        if len(returned) != len(cases):
            return SandboxResult(
                "exception", f"the result was garbled: {len(returned)} answers for {len(cases)} cases"
            )
        rows = [[a, b, expected, got] for (a, b, expected), got in zip(cases, returned)]
        passed = all(got == expected for _, _, expected, got in rows)
        return SandboxResult(
            "passed" if passed else "wrong answer", data["detail"], rows, refused=data["refused"]
        )
    if data:
        return SandboxResult(data["status"], data["detail"], refused=data["refused"])
    if returncode < 0:
        name = signal.Signals(-returncode).name
        reason = {
            "SIGXCPU": "CPU time limit",
            "SIGXFSZ": "file size limit",
            "SIGKILL": "killed",
            "SIGSEGV": "crashed",
        }.get(name, name)
        return SandboxResult("killed by a limit", f"{reason} ({name})")
    return SandboxResult("exception", f"the process ended (exit {returncode}) without a result")


def _world_executable(path: str) -> bool:
    """Can any user run `path`? (Every folder above it searchable, the file executable by others.)"""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in real.parents) and bool(os.stat(real).st_mode & 0o001)


def _sandbox_python() -> tuple[str, int | None]:
    """The interpreter for the child, and the user it drops to. As root the child drops to nobody (root
    ignores the process limit), so nobody must be able to run it; anyone else needs one they may run
    (a virtual environment can point into a home folder that others cannot enter)."""
    root = os.geteuid() == 0
    for candidate in (sys.executable, sys._base_executable, "/usr/bin/python3"):
        if (
            candidate
            and os.path.exists(candidate)
            and (_world_executable(candidate) if root else os.access(candidate, os.X_OK))
        ):
            return candidate, (NOBODY if root else None)
    raise RuntimeError(
        f"the sandbox needs a Python that the user {'nobody' if root else os.getuid()} may run "
        f"(for example /usr/bin/python3); none was found"
    )


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
            kept.extend(chunk[: max(room, 0)])
            if len(chunk) > room and on_overflow:
                state["overflow"] = True
                return on_overflow()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()

    def text() -> str:
        thread.join(timeout=2)
        return kept.decode("utf-8", "replace")

    return text, lambda: state["overflow"]
