"""The sandbox against hostile code. Each route out is tried with both layers and with the kernel's alone
(the audit hook off), by root and by an ordinary user, against a host that must stay unharmed: a
world-writable folder outside the sandbox holding a file its user owns, listening sockets, and a process
of its user. Each route is first shown to harm that host when nothing guards it."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import sandbox
from helpers.sandbox import NOBODY, Limits, run_sandboxed

ROOT = os.geteuid() == 0
USER = 54321  # an ordinary user made for these tests: no name, no files, no other processes

# route -> the body of f(a, b): each tries to change something of the host's.
FILES = {
    "create a file": "open('{folder}/new.txt', 'w').write('x')",
    "append to a file": "open('{keep}', 'a').write('x')",
    "os.rename a file out": "os.rename('{keep}', 'taken.txt')",
    "os.replace a file over it": "open('mine.txt', 'w').write('x')\nos.replace('mine.txt', '{keep}')",
    "shutil.move a file out": "import shutil\nshutil.move('{keep}', 'taken.txt')",
    "hard link, then write": "os.link('{keep}', 'linked.txt')\nopen('linked.txt', 'a').write('x')",
    "symlink, then write": "os.symlink('{keep}', 'link.txt')\nopen('link.txt', 'a').write('x')",
    "os.truncate by path": "os.truncate('{keep}', 0)",
    "os.chmod": "os.chmod('{keep}', 0o600)",
    "os.remove": "os.remove('{keep}')",
    "os.open with dir_fd": "d = os.open('{folder}', os.O_RDONLY | os.O_DIRECTORY)\n"
    "os.write(os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=d), b'x')",
    "os.unlink with dir_fd": "os.unlink('keep.txt', dir_fd=os.open('{folder}', os.O_RDONLY | os.O_DIRECTORY))",
    "rebind what a hook might use, then write": "import builtins\nos.path.realpath = lambda p: '.'\nos.fsdecode = str\n"
    "builtins.PermissionError = None\nopen('{keep}', 'a').write('x')",
    "native code (ctypes)": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unlink(b'{keep}'):\n    raise OSError(ctypes.get_errno(), 'unlink')",
}
PROCESSES = {  # each would leave {marker} behind
    "os.fork": "if os.fork() == 0:\n    open('{marker}', 'w')\n    os._exit(0)\nos.wait()",
    "os.posix_spawn": "os.waitpid(os.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}}), 0)",
    "os.system": "status = os.system('touch {marker}')\nif status:\n    raise OSError(f'os.system returned {{status}}')",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)",
    "os.execv": "os.execv('/usr/bin/touch', ['touch', '{marker}'])",
    "pty.fork": "import pty\nif pty.fork()[0] == 0:\n    open('{marker}', 'w')\n    os._exit(0)\nos.wait()",
}
SOCKETS = {
    "TCP connect": "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=2).sendall(b'x')",
    "UDP datagram": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp}))",
    "unix stream socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('{unix}')\ns.sendall(b'x')",
    "unix datagram": "import socket\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', '{unix_dgram}')",
    "abstract unix socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{abstract}')\ns.sendall(b'x')",
    "widen the hook's allow list, then send": "import sys\ng = sys._getframe(1).f_globals\n"
    "g.get('MODULES', set()).add('socket')\ng.get('EVENTS', set()).add('socket.sendto')\n"
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp}))",
    "raw IP packet": "import socket, struct\n"  # a whole IPv4 + UDP packet, to the UDP listener
    "udp = struct.pack('!HHHH', 40000, {udp}, 9, 0) + b'x'\n"
    "ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 29, 0, 0, 64, 17, 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n"
    "s.sendto(ip + udp, ('127.0.0.1', 0))",
}
SIGNALS = {
    "os.kill a process of its user": "os.kill({victim}, 9)",
    "kill(-1): every process it may signal": "os.kill(-1, 9)",  # only as the tests' own user (see below)
}
READS = {  # reading is allowed, but not another process's memory or environment (ptrace's rules)
    "read a process's environment through /proc": "print(open('/proc/{victim}/environ').read())",
}
ROUTES = {**FILES, **PROCESSES, **SOCKETS, **SIGNALS, **READS}
CONTROL_AS_ROOT = {"raw IP packet"}  # needs CAP_NET_RAW to harm at all

# What stops each route with both layers on: the audit hook, naming the event, except for reading (Landlock).
BOTH = {
    route: "blocked by the audit hook: import " + body.split()[1].split(",")[0]
    for route, body in ROUTES.items()
    if body.startswith("import ")
}
BOTH.update(
    {
        route: f"blocked by the audit hook: {event}"
        for route, event in {
            "rebind what a hook might use, then write": "open",
            "widen the hook's allow list, then send": "import socket",
            "create a file": "open",
            "append to a file": "open",
            "os.rename a file out": "os.rename",
            "os.replace a file over it": "os.rename",
            "hard link, then write": "os.link",
            "symlink, then write": "os.symlink",
            "os.truncate by path": "os.truncate",
            "os.chmod": "os.chmod",
            "os.remove": "os.remove",
            "os.open with dir_fd": "open keep.txt for writing",
            "os.unlink with dir_fd": "os.remove",
            "os.fork": "os.fork",
            "os.posix_spawn": "os.posix_spawn",
            "os.system": "os.system",
            "os.execv": "os.exec",
            "os.kill a process of its user": "os.kill",
            "kill(-1): every process it may signal": "os.kill",
        }.items()
    }
)
BOTH["read a process's environment through /proc"] = (
    "[Errno 13]"  # the hook allows reading; Landlock does not
)


def kernel_stop(route: str, uid: int) -> tuple[str, str | None]:
    """(the layer, the error it gives) that stops `route` with the audit hook off, on a kernel with Landlock
    ABI 6 or later and network namespaces; None: no error at all, and still no harm."""
    if route in FILES and route not in ("os.chmod", "shutil.move a file out"):
        return (
            "Landlock",
            "[Errno 18]" if route == "hard link, then write" else "[Errno 13]",
        )  # EXDEV: no REFER
    return {
        "os.chmod": ("seccomp", "[Errno 1]"),
        # the rename refused by Landlock, shutil's fallback copy then stops at the timestamps (seccomp)
        "shutil.move a file out": ("Landlock, then seccomp", "[Errno 1]"),
        "os.system": (
            "rlimit (no processes)",
            "os.system returned",
        ),  # glibc: a spawn that failed is exit 127
        # after the drop from root the kernel marks the process as over its process limit, and exec fails
        "os.execv": ("rlimit (no processes)", "[Errno 11]")
        if uid == NOBODY
        else ("Landlock (nothing executable)", "[Errno 13]"),
        "pty.fork": ("Landlock (/dev/ptmx not writable)", "out of pty devices"),
        "TCP connect": ("Landlock (no TCP connect)", "[Errno 13]"),
        "UDP datagram": ("network namespace", "[Errno 101]"),
        "widen the hook's allow list, then send": ("network namespace", "[Errno 101]"),
        "unix stream socket": ("seccomp", "[Errno 1]"),
        "unix datagram": ("seccomp", "[Errno 1]"),
        "abstract unix socket": ("seccomp", "[Errno 1]"),
        "raw IP packet": ("user nobody (no CAP_NET_RAW)", "[Errno 1]")
        if uid == NOBODY
        else ("network namespace", "[Errno 101]"),
        "os.kill a process of its user": ("Landlock (signals scoped)", "[Errno 1]"),
        "read a process's environment through /proc": ("Landlock (no ptrace outside)", "[Errno 13]"),
        # kill(-1) reports success when every process it tried refused it (EPERM is not counted)
        "kill(-1): every process it may signal": ("Landlock (signals scoped)", None),
    }.get(route, ("rlimit (no processes)", "[Errno 11]"))


@dataclass
class Host:
    """What the sandbox must leave as it was: a folder, a file its user owns, listeners, a process."""

    folder: Path
    uid: int

    def __post_init__(self):
        self.folder.chmod(0o777)
        self.keep = self.folder / "keep.txt"
        self.keep.write_text("precious\n")
        self.keep.chmod(0o666)
        if ROOT:
            os.chown(self.keep, self.uid, self.uid)
        self.sockets = {
            "tcp": socket.create_server(("127.0.0.1", 0)),
            "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            "unix": socket.socket(socket.AF_UNIX),
            "unix_dgram": socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
            "abstract": socket.socket(socket.AF_UNIX),
        }
        self.sockets["udp"].bind(("127.0.0.1", 0))
        self.abstract = f"sandbox-host-{uuid.uuid4().hex}"
        for name, address in (("unix", "unix.sock"), ("unix_dgram", "dgram.sock")):
            self.sockets[name].bind(str(self.folder / address))
            os.chmod(self.folder / address, 0o777)
        self.sockets["abstract"].bind("\0" + self.abstract)
        for name in ("unix", "abstract"):
            self.sockets[name].listen()
        for s in self.sockets.values():
            s.setblocking(False)
        self.secret = f"secret-{uuid.uuid4().hex}"  # in the environment of a process of the sandbox's user
        self.victim = subprocess.Popen(
            ["sleep", "120"],
            user=self.uid if ROOT else None,
            env={"PATH": "/usr/bin:/bin", "HOST_SECRET": self.secret},
        )
        self.before = self.state()

    def names(self) -> dict:
        return dict(
            folder=self.folder,
            keep=self.keep,
            marker=self.folder / "spawned",
            victim=self.victim.pid,
            tcp=self.sockets["tcp"].getsockname()[1],
            udp=self.sockets["udp"].getsockname()[1],
            unix=self.folder / "unix.sock",
            unix_dgram=self.folder / "dgram.sock",
            abstract=self.abstract,
        )

    def state(self) -> dict:
        found = {}
        for path in sorted(self.folder.iterdir()):
            st = path.lstat()
            found[path.name] = (
                st.st_mode,
                st.st_uid,
                st.st_nlink,
                path.read_bytes() if path.is_file() else None,
            )
        return found

    def harms(self, printed: str = "") -> list[str]:
        harms = (
            [] if self.state() == self.before else [f"the folder changed: {self.before} -> {self.state()}"]
        )
        if self.secret in printed:
            harms.append("the secret in another process's environment was read")
        for name in ("tcp", "unix", "abstract"):
            try:
                self.sockets[name].accept()
                harms.append(f"{name}: a connection arrived")
            except BlockingIOError:
                pass
        for name in ("udp", "unix_dgram"):
            try:
                harms.append(f"{name}: {self.sockets[name].recv(64)!r} arrived")
            except BlockingIOError:
                pass
        if self.victim.poll() is not None:
            harms.append(f"the process of its user ended ({self.victim.returncode})")
        return harms

    def close(self):
        self.victim.kill()
        self.victim.wait()
        for s in self.sockets.values():
            s.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def candidate(route: str, host: Host) -> str:
    body = ROUTES[route].format(**host.names())
    return (
        "import os\n\ndef f(a, b):\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "    return 0\n"
    )


def as_user(uid: int, function, *args, **kwargs):
    """function(*args, **kwargs) in a forked copy of this process that has dropped to `uid` (no root left):
    its return value, or its exception raised here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            outcome = (True, function(*args, **kwargs))
        except BaseException as exc:  # noqa: B036 - everything goes back to the test
            outcome = (False, exc)
        try:
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


@dataclass
class Caller:
    """Who calls run_sandboxed: root (the child drops to nobody) or an ordinary user (it stays that user)."""

    name: str
    uid: int  # the user the sandboxed code runs as
    held: object = None  # what held in a first run

    def run(self, code: str, **kwargs):
        kwargs.setdefault("cases", [("a", "b", 1)])
        if self.name == "user" and ROOT:
            try:
                return as_user(USER, run_sandboxed, code, **kwargs)
            except RuntimeError as exc:  # no Python that user may run
                pytest.skip(f"the ordinary user's path needs a Python that uid {USER} may run: {exc}")
        return run_sandboxed(code, **kwargs)


HELD = {}  # caller -> what held in its first run, or why it could not run


@pytest.fixture(params=["root", "user"])
def caller(request):
    if request.param == "root" and not ROOT:
        pytest.skip(
            f"pytest runs as uid {os.getuid()}, not root: the root path runs where the suite runs as root (CI)"
        )
    if request.param == "user" and ROOT and not _readable_by_others(sandbox.CHILD):
        pytest.skip(
            f"the ordinary user's path needs {sandbox.CHILD} readable by uid {USER} (every folder above it too)"
        )
    made = Caller(request.param, NOBODY if request.param == "root" else (USER if ROOT else os.getuid()))
    if request.param not in HELD:
        try:
            HELD[request.param] = made.run("def f(a, b):\n    return 1\n").protections
        except OSError as exc:  # the kernel offers neither Landlock nor namespaces: run_sandboxed refuses
            HELD[request.param] = str(exc)
    if isinstance(HELD[request.param], str):
        pytest.skip(HELD[request.param])
    made.held = HELD[request.param]
    return made


def _readable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in path.parents) and bool(path.stat().st_mode & 0o004)


@pytest.fixture
def host(caller):
    folder = Path(tempfile.mkdtemp(prefix="host-"))
    if not all(p.stat().st_mode & 0o001 for p in folder.parents):
        pytest.skip(f"{folder.parent} is not searchable by other users")
    made = Host(folder, caller.uid)
    yield made
    made.close()


def skip_unless_own_user(route: str, caller: Caller):
    if route.startswith("kill(-1)") and caller.uid != USER:
        pytest.skip(
            "kill(-1) runs only as the tests' own user, who has nothing else to lose (pytest as root)"
        )


# ---------------------------------------------------------------- every route harms an unguarded host


@pytest.mark.parametrize("route", ROUTES)
def test_the_route_harms_a_host_that_nothing_guards(route):
    """Without the sandbox, the same code does the harm the tests below look for (so they are not vacuous)."""
    as_root = route in CONTROL_AS_ROOT
    if as_root and not ROOT:
        pytest.skip("needs CAP_NET_RAW, that is root, to do harm")
    if route.startswith("kill(-1)") and not ROOT:
        pytest.skip("kill(-1) as the user running pytest would end that user's session")
    # kill(-1) unguarded ends every process of its user: a user of its own, apart from other tests' processes
    uid = 0 if as_root else (USER + 1 if route.startswith("kill(-1)") else USER) if ROOT else os.getuid()
    python = sys.executable if uid == os.getuid() else as_user(uid, sandbox._sandbox_python)[0]
    made = Host(Path(tempfile.mkdtemp(prefix="host-")), uid)
    try:
        scratch = Path(tempfile.mkdtemp(prefix="control-"))
        (scratch / "candidate.py").write_text(candidate(route, made))
        if ROOT:
            shutil.chown(scratch, uid, uid)
        done = subprocess.run(
            [python, "-I", "-c", "exec(open('candidate.py').read()); f('a', 'b')"],
            cwd=scratch,
            user=uid if ROOT else None,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert made.harms(done.stdout), (
            f"{route}: did no harm unguarded, so the sandbox's test of it proves nothing"
        )
    finally:
        made.close()
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- the sandbox keeps every route out


@pytest.mark.parametrize("route", ROUTES)
def test_both_layers_keep_the_host_unharmed(route, caller, host):
    skip_unless_own_user(route, caller)
    result = caller.run(candidate(route, host))
    assert host.harms(result.output) == []
    assert result.status == "exception" and BOTH[route] in result.detail, result.detail
    assert result.protections.audit_hook and bool(result.refused) == ("audit hook" in BOTH[route])


@pytest.mark.parametrize("route", ROUTES)
def test_the_kernel_alone_keeps_the_host_unharmed(route, caller, host):
    """The audit hook off: what the kernel's layers stop by themselves."""
    skip_unless_own_user(route, caller)
    if caller.held.landlock < 6 or not caller.held.namespace:
        pytest.skip(
            f"written for Landlock ABI 6+ and a network namespace; here: {'; '.join(caller.held.lines())}"
        )
    result = caller.run(candidate(route, host), layers="kernel")
    assert host.harms(result.output) == []
    layer, error = kernel_stop(route, caller.uid)
    if error is None:
        assert result.status == "wrong answer", f"{route}: expected {layer}, silently: {result.detail}"
    else:
        assert result.status == "exception" and error in result.detail, (
            f"{route}: expected {layer}: {result.detail}"
        )
    assert not result.protections.audit_hook and not result.refused


def test_a_fork_bomb_memory_and_floods_meet_the_limits(caller, host):
    bomb = "import os\ndef f(a, b):\n    while True:\n        os.fork()\n"
    assert "os.fork" in caller.run(bomb).detail
    assert "Resource temporarily unavailable" in caller.run(bomb, layers="kernel").detail
    hoard = "def f(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(10**7))\n"
    flood = "def f(a, b):\n    print('x' * 10_000_000)\n    return 0\n"
    for layers in ("both", "kernel"):
        memory = caller.run(hoard, limits=Limits(memory_mb=256), layers=layers)
        assert memory.status == "killed by a limit" and "memory" in memory.detail
        output = caller.run(flood, limits=Limits(output_kib=64), layers=layers)
        assert output.status == "killed by a limit" and len(output.output) == 64 * 1024
    assert host.harms() == []


# ---------------------------------------------------------------- what held, and where the kernel offers less


def test_the_result_says_what_held(caller):
    held = caller.run("def f(a, b):\n    return 1\n").protections
    assert held.uid == caller.uid and held.no_new_privs and held.audit_hook
    assert held.limits["NPROC"] == 0 and held.limits["AS"] == 512 << 20
    assert held.landlock or held.namespace, "this machine's kernel offers neither Landlock nor namespaces"
    text = str(held)
    assert "audit hook: deny by default" in text and f"uid {caller.uid}" in text
    assert (f"Landlock ABI {held.landlock}" in text) == bool(held.landlock)


def test_a_kernel_without_landlock_or_namespaces_is_refused_unless_the_hook_alone_is_asked_for(
    monkeypatch, caller
):
    monkeypatch.setattr(sandbox, "_KERNEL", ("seccomp",))  # stands for a kernel that offers neither
    for layers in ("both", "kernel"):
        with pytest.raises(OSError, match=r"neither Landlock nor a network namespace.*layers='audit hook'"):
            caller.run("def f(a, b):\n    return 1\n", layers=layers)
    alone = caller.run("def f(a, b):\n    return 1\n", layers="audit hook")
    assert alone.status == "passed" and "audit hook: deny by default (alone" in str(alone.protections)
    assert not (alone.protections.landlock or alone.protections.namespace or alone.protections.seccomp)


def test_without_a_namespace_no_socket_can_be_made(monkeypatch, caller, host):
    monkeypatch.setattr(sandbox, "_KERNEL", ("landlock", "seccomp"))  # as where user namespaces are off
    result = caller.run(candidate("UDP datagram", host), layers="kernel")
    assert host.harms() == [] and "[Errno 1]" in result.detail
    assert result.protections.seccomp.startswith("all sockets") and not result.protections.namespace


def test_layers_must_be_named():
    with pytest.raises(ValueError, match="layers must be one of 'both', 'kernel', 'audit hook'"):
        run_sandboxed("def f(a, b):\n    return 1\n", layers="none")


# ---------------------------------------------------------------- the seccomp program, on both architectures


def run_bpf(program, nr: int, arch: int, arg0: int = 0) -> int:
    """A classic-BPF interpreter for the four instructions the filter uses, over struct seccomp_data."""
    data = {0: nr, 4: arch, 16: arg0}
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = data[k]
        elif code == 0x06:
            return k
        else:
            taken = acc == k if code == 0x15 else acc >= k
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_seccomp_program_answers_what_it_should(arch):
    child = _child_module()
    audit_arch, calls = child.SECCOMP[arch]
    allow, eperm = 0x7FFF0000, 0x00050001
    unix_only = child.seccomp_filter(arch, deny_signals=False, deny_all_sockets=False)
    assert run_bpf(unix_only, calls["socket"], audit_arch, arg0=socket.AF_UNIX) == eperm
    assert run_bpf(unix_only, calls["socket"], audit_arch, arg0=socket.AF_INET) == allow
    assert run_bpf(unix_only, calls["io_uring_setup"], audit_arch) == eperm
    assert all(run_bpf(unix_only, n, audit_arch) == eperm for n in calls["metadata"])
    assert run_bpf(unix_only, calls["signals"][0], audit_arch) == allow  # Landlock scopes them
    assert run_bpf(unix_only, 0, audit_arch) == allow and run_bpf(unix_only, 1, audit_arch) == allow
    assert run_bpf(unix_only, calls["socket"], 0x40000003) == eperm  # another architecture's calls
    strict = child.seccomp_filter(arch, deny_signals=True, deny_all_sockets=True)
    assert run_bpf(strict, calls["socket"], audit_arch, arg0=socket.AF_INET) == eperm
    assert all(run_bpf(strict, n, audit_arch) == eperm for n in calls["signals"])
    if arch == "x86_64":
        assert run_bpf(strict, 0x40000000 + 41, audit_arch) == eperm  # the x32 ABI's socket


def _child_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_child", sandbox.CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; main() runs as a program
    return module


# ---------------------------------------------------------------- the report: what the code cannot forge


def test_the_expected_answers_never_reach_the_sandbox():
    code = "def f(a, b):\n    return open('spec.json').read()\n"
    spec = json.loads(run_sandboxed(code, cases=[("kitten", "sitting", 3)]).cases[0][3])
    assert spec["inputs"] == [["kitten", "sitting"]] and "cases" not in spec  # the 3 stays here


def test_a_forged_report_cannot_claim_a_pass_or_a_refusal():
    forge = (
        "import json, os\ndef f(a, b):\n    fd = json.load(open('spec.json'))['fd']\n"
        "    os.write(fd, json.dumps({report}).encode() + b'\\n')\n    os._exit(0)\n"
    )
    claims = {"status": "ran", "detail": "tested f", "returned": [0], "refused": []}
    assert run_sandboxed(forge.format(report=claims), cases=[("abc", "", 3)]).status == "wrong answer"
    garbled = run_sandboxed(forge.format(report={"status": "passed", "cases": []}), cases=[("abc", "", 3)])
    assert garbled.status == "exception" and "garbled" in garbled.detail
    refusal = run_sandboxed(forge.format(report=dict(claims, status="refused", detail="no kernel")))
    assert refusal.status == "exception" and "a refusal the kernel did not make" in refusal.detail


def test_cases_must_be_triples():
    with pytest.raises(ValueError, match=r"\(word1, word2, expected distance\) triples"):
        run_sandboxed("def f(a, b):\n    return 1\n", cases=[("a", "b")])


def test_the_readme_counts_the_routes():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"`tests/test_sandbox.py` tries {len(ROUTES)} routes out" in " ".join(readme.split())
