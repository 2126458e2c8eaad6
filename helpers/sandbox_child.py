"""The sandbox's child program: `checking.run_sandboxed` copies it into a fresh directory and runs
it as a separate, limited Python process (`python -I runner.py`); it is never imported. It reads
spec.json and candidate.py from that directory, finds the candidate's two-argument function,
installs an audit hook that refuses process creation, sockets, ctypes and writes outside the
directory, runs the test cases, and writes one JSON result to the file descriptor it was given."""
import ast
import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "os.kill", "os.killpg", "socket.connect", "socket.bind", "ctypes.dlopen", "ctypes.dlsym"}
ROOT = os.path.realpath(".")


def inside(path) -> bool:
    full = os.path.realpath(os.fsdecode(path))
    return full == ROOT or full.startswith(ROOT + os.sep)


def guard(event, args):
    """The audit hook: refuse what a function computing an edit distance never needs."""
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


def find_function(tree, names):
    """(class name or None, function name) of the two-argument function to test; None if none."""
    def takes_two(f):
        return isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
            len([a for a in f.args.args if a.arg != "self"]) == 2
    found = [(None, f.name) for f in tree.body if takes_two(f)]
    found += [(c.name, f.name) for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body if takes_two(f)]
    preferred = [item for item in found if item[1] in names]
    return (preferred or found)[-1] if found else None


def run_cases(tree, owner, name, cases):
    """Run the candidate (the audit hook already on) over the cases: (status, detail, results)."""
    namespace = {"__name__": "candidate"}
    try:
        exec(compile(tree, "candidate.py", "exec"), namespace)
        function = getattr(namespace[owner](), name) if owner else namespace[name]
        results = []
        for a, b, expected in cases:
            got = function(a, b)
            results.append([a, b, expected, got if isinstance(got, (int, float, str, type(None))) else repr(got)])
    except MemoryError:
        return "killed by a limit", "memory limit reached (MemoryError)", []
    except OSError as exc:
        if exc.errno == 27:  # EFBIG: the file size limit
            return "killed by a limit", "file size limit reached", []
        return "exception", f"{type(exc).__name__}: {exc}", []
    except BaseException as exc:
        return "exception", f"{type(exc).__name__}: {exc}", []
    passed = all(got == expected for _, _, expected, got in results)
    label = f"{owner}().{name}" if owner else name
    return ("passed" if passed else "wrong answer"), f"tested {label}", results


def main():
    spec = json.loads(open("spec.json").read())
    results = os.fdopen(spec["fd"], "w")
    try:
        tree = ast.parse(open("candidate.py", encoding="utf-8").read())
        target = find_function(tree, spec["names"])
        if target is None:
            status, detail, cases = "no function found", "no function of two arguments in the code", []
        else:
            sys.addaudithook(guard)  # from here on, the guard cannot be removed
            status, detail, cases = run_cases(tree, *target, spec["cases"])
    except (SyntaxError, ValueError) as exc:
        status, detail, cases = "no function found", f"not valid Python: {exc}", []
    results.write(json.dumps({"status": status, "detail": detail, "cases": cases}))
    results.close()


if __name__ == "__main__":
    main()
