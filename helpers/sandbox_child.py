"""The sandbox's child program: `sandbox.run_sandboxed` copies it into a fresh folder and runs it as a
separate process (`python -I -S -B runner.py`); it is never imported, and imports nothing but the standard
library. Before it reads the candidate's code it asks the kernel for its layers (`kernel_layers`: a
network namespace, the drop from root to nobody, no new privileges, seccomp, Landlock), installs the
deny-by-default audit hook (`make_guard`), and writes what held as the first line of its result pipe. Then it
finds the candidate's two-argument function, calls it on each pair of inputs and writes one JSON result
line: what it returned (the expected answers stay with the caller).

The kernel's interfaces: landlock(7) and Documentation/userspace-api/landlock.rst, seccomp(2),
unshare(2), prctl(2), include/uapi/linux/{landlock,seccomp,filter,audit,sched}.h."""

import ast
import errno
import json
import os
import sys

FOLDER = os.getcwd()

# Landlock's system calls have the generic numbers (include/uapi/asm-generic/unistd.h), the same on x86-64
# (arch/x86/entry/syscalls/syscall_64.tbl) and aarch64.
CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446
# Filesystem rights (landlock.h: LANDLOCK_ACCESS_FS_*); all rights an ABI knows are "handled", so what no
# rule grants is refused. ABI 2 added REFER (rename/link into another folder), 3 TRUNCATE, 5 IOCTL_DEV.
READ_FILE, READ_DIR, WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 2, 1 << 3, 1 << 1, 1 << 4, 1 << 5
MAKE_DIR, MAKE_REG, REFER, TRUNCATE = 1 << 7, 1 << 8, 1 << 13, 1 << 14
FS_HANDLED = {5: (1 << 16) - 1, 3: (1 << 15) - 1, 2: (1 << 14) - 1, 1: (1 << 13) - 1}
READ_ANYWHERE = READ_FILE | READ_DIR  # no EXECUTE anywhere: no exec* once this program runs
IN_FOLDER = READ_ANYWHERE | WRITE_FILE | MAKE_REG | MAKE_DIR | REMOVE_FILE | REMOVE_DIR | REFER | TRUNCATE
TCP_BIND_CONNECT = 0b11  # ABI 4: LANDLOCK_ACCESS_NET_BIND_TCP | _CONNECT_TCP, with no port allowed
SCOPE_UNIX_SIGNAL = 0b11  # ABI 6: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
NOBODY = 65534

# Seccomp stops what Landlock does not see: unix sockets (a namespace does not isolate socket files; without
# a namespace, every socket), io_uring (its operations would skip this filter), changes to the metadata of
# files the user owns (chmod, chown, xattrs, timestamps), and signals where Landlock cannot scope them.
# (AUDIT_ARCH_* from audit.h, numbers from syscall_64.tbl and asm-generic/unistd.h.)
SECCOMP = {
    "x86_64": (
        0xC000003E,
        dict(
            socket=41,
            io_uring_setup=425,
            signals=(62, 200, 234, 129, 297, 424),
            metadata=(
                90,
                91,
                92,
                93,
                94,
                132,
                188,
                189,
                190,
                197,
                198,
                199,
                235,
                260,
                261,
                268,
                280,
                452,
                463,
                466,
            ),
        ),
    ),
    "aarch64": (
        0xC00000B7,
        dict(
            socket=198,
            io_uring_setup=425,
            signals=(129, 130, 131, 138, 240, 424),
            metadata=(5, 6, 7, 14, 15, 16, 52, 53, 54, 55, 88, 452, 463, 466),
        ),
    ),
}

# The audit hook's allow list: what compiling and running a pure function needs, found with a logging hook.
EVENTS = {
    "compile",
    "exec",
    "marshal.loads",
    "builtins.id",
    "sys._getframe",
    "object.__getattr__",
    "os.listdir",
    "time.sleep",
    "cpython._PySys_ClearAuditHooks",
}
MODULES = set(
    """__future__ abc array bisect _bisect cmath collections collections.abc copy decimal _decimal
    enum fractions functools heapq _heapq itertools keyword math numbers operator random _random _sha512
    statistics _statistics string _string textwrap time types typing _typing unicodedata warnings weakref
    _weakrefset""".split()
) | {"org.python.core", "org.python", "org"}  # copy probes for Jython's, in vain
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
REFUSED = []  # what the hook refused, even where the candidate caught the exception


def syscall(function, *args):
    """Call a libc function with integer or pointer arguments; raise OSError on -1."""
    import ctypes

    result = function(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def landlock(libc) -> int:
    """Reading anywhere, writing only in FOLDER; no TCP bind or connect (ABI 4); signals and abstract unix
    sockets only within the sandbox (ABI 6). -> the ABI in force."""
    import ctypes

    class PathBeneath(ctypes.Structure):  # struct landlock_path_beneath_attr, packed
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    abi = syscall(libc.syscall, CREATE_RULESET, None, 0, 1)  # 1: LANDLOCK_CREATE_RULESET_VERSION
    handled = next(mask for version, mask in FS_HANDLED.items() if abi >= version)
    attr = (ctypes.c_uint64 * 3)(
        handled, TCP_BIND_CONNECT if abi >= 4 else 0, SCOPE_UNIX_SIGNAL if abi >= 6 else 0
    )
    ruleset = syscall(libc.syscall, CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    for path, access in (("/", READ_ANYWHERE), (FOLDER, IN_FOLDER)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(access & handled, fd)
        syscall(libc.syscall, ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)  # 1: LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
    syscall(libc.syscall, RESTRICT_SELF, ruleset, 0)
    os.close(ruleset)
    return abi


def seccomp_filter(arch: str, deny_signals: bool, deny_all_sockets: bool) -> list:
    """A classic-BPF program over struct seccomp_data (nr at offset 0, arch at 4, args[0] at 16):
    -> [(code, jt, jf, k)] that answers EPERM to the calls above and allows the rest."""
    load, equal, at_least, answer = (
        0x20,
        0x15,
        0x35,
        0x06,
    )  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    audit_arch, calls = SECCOMP[arch]
    denied = (
        list(calls["metadata"]) + [calls["io_uring_setup"]] + list(calls["signals"] if deny_signals else ())
    )
    body = [(load, 0, 0, 0)]
    if arch == "x86_64":
        body.append((at_least, "deny", 0, 0x40000000))  # the x32 ABI's numbers
    body += [(equal, "deny", 0, number) for number in denied]
    if deny_all_sockets:
        body.append((equal, "deny", 0, calls["socket"]))
    else:  # socket(AF_UNIX, ...) only
        body += [(equal, 0, "allow", calls["socket"]), (load, 0, 0, 16), (equal, "deny", "allow", 1)]
    program = [(load, 0, 0, 4), (equal, 1, 0, audit_arch), (answer, 0, 0, deny)] + body
    program += [(answer, 0, 0, allow), (answer, 0, 0, deny)]
    last = len(program) - 1
    where = {"allow": last - 1, "deny": last}
    return [
        (code, where[jt] - i - 1 if jt in where else jt, where[jf] - i - 1 if jf in where else jf, k)
        for i, (code, jt, jf, k) in enumerate(program)
    ]


def install_seccomp(libc, arch: str, deny_signals: bool, deny_all_sockets: bool) -> None:
    import ctypes

    class Filter(ctypes.Structure):  # struct sock_filter
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Program(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    instructions = seccomp_filter(arch, deny_signals, deny_all_sockets)
    table = (Filter * len(instructions))(*(Filter(*i) for i in instructions))
    syscall(
        libc.prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(Program(len(instructions), table)), 0, 0
    )


def why(exc: OSError, reasons: dict) -> str:
    return f"{reasons.get(exc.errno, exc.strerror)} ({errno.errorcode.get(exc.errno, exc.errno)})"


def kernel_layers(wanted, drop_to) -> dict:
    """Ask the kernel for each layer in `wanted`, in the order that lets each one work, dropping from root to
    `drop_to` after the network namespace: -> what held, and why each missing layer is missing."""
    import ctypes

    held = dict(landlock=0, namespace=False, seccomp="", no_new_privs=False, missing=[], uid=os.getuid())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if "namespace" in wanted:  # as root a network namespace alone; anyone else needs a user namespace with it
        try:
            syscall(libc.unshare, CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET)
            held["namespace"] = True
        except OSError as exc:
            held["missing"].append(
                "network namespace: "
                + why(
                    exc,
                    {
                        errno.EPERM: "refused (in a container without CAP_SYS_ADMIN?)"
                        if os.geteuid() == 0
                        else "unprivileged user namespaces are off",
                        errno.ENOSPC: "user.max_user_namespaces is 0",
                        errno.EINVAL: "this kernel has no user or network namespaces",
                    },
                )
            )
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)
        held["uid"] = drop_to  # (in a user namespace of its own, getuid() would say 65534 whoever it is)
    syscall(
        libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0
    )  # first: seccomp and Landlock require it without root
    held["no_new_privs"] = True
    arch = os.uname().machine
    if "landlock" in wanted and arch not in SECCOMP:
        held["missing"].append(f"Landlock: its system call numbers on {arch} are not known here")
    elif "landlock" in wanted:
        try:
            held["landlock"] = landlock(libc)
        except OSError as exc:
            held["missing"].append(
                "Landlock: "
                + why(
                    exc,
                    {
                        errno.ENOSYS: "not in this kernel (it needs Linux 5.13 or later, built with Landlock)",
                        errno.EOPNOTSUPP: "built in but off: 'landlock' is missing from the lsm= boot parameter",
                    },
                )
            )
    if "seccomp" in wanted and arch in SECCOMP:
        signals, sockets = held["landlock"] < 6, not held["namespace"]
        try:
            install_seccomp(libc, arch, signals, sockets)
            held["seccomp"] = ", ".join(
                ["all sockets" if sockets else "unix sockets", "io_uring", "chmod, chown, xattrs, timestamps"]
                + (["signals"] if signals else [])
            )
        except OSError as exc:
            held["missing"].append("seccomp: " + why(exc, {errno.EINVAL: "not in this kernel"}))
    return held


def make_guard(refused: list):
    """The audit hook, deny by default: allow what a pure function needs, refuse anything else and name it.
    What it relies on is bound here, where the candidate cannot rebind it (it can rebind names in any
    module, os.path and builtins included), and it relies on no library code: a write is allowed only
    through open() to a plain file name in its folder (no symbolic or hard links can be made there)."""
    events, modules, write_flags = frozenset(EVENTS), frozenset(MODULES), WRITE_FLAGS
    str_, bytes_, int_, type_, any_, bool_, isinstance_ = str, bytes, int, type, any, bool, isinstance
    permission, import_error = PermissionError, ImportError

    def name(value) -> str:
        return value.decode("utf-8", "replace") if type_(value) is bytes_ else str_(value)

    def guard(event, args):
        if (
            event in events
            or (event == "import" and args[0] in modules)
            or (event == "object.__setattr__" and isinstance_(args[0], type_))
        ):  # class attributes only
            return
        if event == "open":
            path, mode, flags = args
            writing = (type_(mode) is str_ and any_(c in mode for c in "wax+")) or bool_(
                (flags or 0) & write_flags
            )
            plain = (
                type_(path) in (str_, bytes_) and "/" not in name(path) and name(path) not in ("", ".", "..")
            )
            if not writing or (
                type_(mode) is str_ and plain
            ):  # os.open (mode None) could name a folder by fd
                return
            what = f"open {name(path)} for writing"
        else:
            first = args[0] if args and type_(args[0]) in (str_, bytes_, int_) else ""
            what = f"{event} {name(first)}".strip()
        refused.append(what)
        raise (import_error if event == "import" else permission)(f"blocked by the audit hook: {what}")

    return guard


def find_function(tree, names):
    """(class name or None, function name) of the two-argument function to test; None if none."""

    def takes_two(f):
        return (
            isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and len([a for a in f.args.args if a.arg != "self"]) == 2
        )

    found = [(None, f.name) for f in tree.body if takes_two(f)]
    found += [
        (c.name, f.name) for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body if takes_two(f)
    ]
    preferred = [item for item in found if item[1] in names]
    return (preferred or found)[-1] if found else None


def run_cases(tree, owner, name, inputs):
    """Run the candidate (every layer already on) on each pair of inputs: (status, detail, what it returned).
    The expected answers never come here: they stay with the caller, which decides what passed."""
    namespace = {"__name__": "candidate"}
    try:
        exec(compile(tree, "candidate.py", "exec"), namespace)
        function = getattr(namespace[owner](), name) if owner else namespace[name]
        returned = []
        for a, b in inputs:
            got = function(a, b)
            returned.append(got if isinstance(got, (int, float, str, type(None))) else repr(got))
    except MemoryError:
        return "killed by a limit", "memory limit reached (MemoryError)", []
    except OSError as exc:
        if exc.errno == errno.EFBIG:  # the file size limit
            return "killed by a limit", "file size limit reached", []
        return "exception", f"{type(exc).__name__}: {exc}", []
    except BaseException as exc:
        return "exception", f"{type(exc).__name__}: {exc}", []
    return "ran", f"tested {owner}().{name}" if owner else f"tested {name}", returned


def check_candidate(spec) -> tuple:
    """Read, parse and run the candidate: (status, detail, what it returned)."""
    try:
        tree = ast.parse(open("candidate.py", encoding="utf-8").read())
    except (SyntaxError, ValueError) as exc:
        return "no function found", f"not valid Python: {exc}", []
    target = find_function(tree, spec["names"])
    if target is None:
        return "no function found", "no function of two arguments in the code", []
    return run_cases(tree, *target, spec["inputs"])


def main():
    import resource

    spec = json.loads(open("spec.json").read())
    report = os.fdopen(spec["fd"], "w")
    held = kernel_layers(spec["kernel"], spec["drop_to"])
    held["limits"] = {
        name: resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[0]
        for name in ("CPU", "AS", "FSIZE", "NPROC", "CORE")
    }
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes", "resource")]:
        del sys.modules[name]  # importing them again raises the audit event the hook refuses
    held["audit_hook"] = spec["audit_hook"]
    if spec["audit_hook"]:
        sys.addaudithook(make_guard(REFUSED))  # from here on it cannot be removed, and nothing else holds it
    report.write(json.dumps(held) + "\n")
    report.flush()  # what held is on record before the candidate's code is read
    if spec["kernel"] and not (held["landlock"] or held["namespace"]):
        status, detail, returned = "refused", "; ".join(held["missing"]), []
    else:
        status, detail, returned = check_candidate(spec)
    report.write(
        json.dumps({"status": status, "detail": detail, "returned": returned, "refused": REFUSED}) + "\n"
    )
    report.close()


if __name__ == "__main__":
    main()
