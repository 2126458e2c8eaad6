"""int8 weights read near the memory's bandwidth on x86 CPUs: a small C kernel of our own (int8_kernel.c).

At decode shapes torch's CPU kernel for int8 weights (`_weight_int8pack_mm`) reads them at a fraction of
the bandwidth on some CPUs (`make bench-kernels`), so a quarter of the bytes did not make a quarter of
the time. int8_kernel.c reads the same int8 values and scales as one stream (4 rows x 16 inputs to a
64-byte line), rounds each token's activations to int16 (one scale a token: finer than bf16's 8-bit
mantissa) and sums the products exactly in int32. int8_ops.cpp makes it two torch operators
(`operators()`), called as torch's own kernels are, from Python or from a compiled graph. Both are compiled
here, once per machine, by the system's C and C++ compilers for this CPU (`-march=native`) against torch's
headers, into the cache folder. Where they cannot be (not x86-64 Linux, no AVX2, no compiler),
`kernel_unavailable()` says why and torch's kernel serves. quantize.py measures both
at load and uses the faster (`MIXTRAL_INT8_KERNEL` forces one). Taught in 10_quantization.

Shapes: T tokens, N outputs (a multiple of ROWS), K inputs (a multiple of COLS).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .files import atomic_file, cache_root
from .hardware import cpuinfo

SOURCE = Path(__file__).with_name("int8_kernel.c")
OPS = Path(__file__).with_name("int8_ops.cpp")  # the kernel as torch operators
ROWS, COLS = 4, 16  # int8_kernel.c's block: 4 rows x 16 inputs, one 64-byte line
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]


def fits(shape) -> bool:
    """Whether a weight [.., N, K] splits into the kernel's blocks."""
    return shape[-2] % ROWS == 0 and shape[-1] % COLS == 0


def relayout(q):
    """int8 [.., N, K] -> [.., N/ROWS, K/COLS, ROWS, COLS]: each block's 4 rows x 16 inputs side by side."""
    *lead, n, k = q.shape
    return q.reshape(*lead, n // ROWS, ROWS, k // COLS, COLS).transpose(-3, -2).contiguous()


def _compile(path: Path, compilers: tuple, torch_folder: Path) -> None:
    """int8_kernel.c by the C compiler, then int8_ops.cpp by the C++ compiler against torch's headers, linked
    into `path`; a RuntimeError with the failing compiler's last line where one fails."""
    c, cxx = compilers
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(_torch()._C._GLIBCXX_USE_CXX11_ABI)}"
    lib = torch_folder / "lib"
    steps = [
        (c, SOURCE, [c, *FLAGS, "-c", str(SOURCE), "-o", f"{path}.o"]),
        (cxx, OPS, [cxx, *FLAGS, "-std=c++20", abi, f"-I{torch_folder / 'include'}", str(OPS), f"{path}.o",
                    "-shared", "-o", str(path), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]),
    ]  # fmt: skip
    try:
        for compiler, source, command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise RuntimeError(f"{compiler} could not build {source.name}: {last}")
    finally:
        Path(f"{path}.o").unlink(missing_ok=True)


def _build(compilers: tuple, torch_folder: Path, path: Path) -> str:
    """Build the kernel and its operators into `path` (atomically, one process at a time); '' or why not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return ""
        try:  # atomic_file removes the half-written file
            atomic_file(path, lambda tmp: _compile(tmp, compilers, torch_folder))
        except RuntimeError as error:
            return str(error)
    return ""


def _torch():
    import torch

    return torch


def _why_not() -> str:
    """Why the kernel cannot be built here, or ''."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the kernel is written for x86-64 Linux, and this is {platform.system()} {platform.machine()}"
    if "avx2" not in cpuinfo("flags").split():
        return "this CPU has no AVX2, which the kernel's instructions need"
    for variable, default, what, package in [("CC", "cc", "C", "gcc"), ("CXX", "c++", "C++", "g++")]:
        compiler = os.environ.get(variable, default)
        if not shutil.which(compiler):
            return (
                f"no {what} compiler ({compiler}) on PATH: install {package} (Debian: apt install {package})"
                + (f" or set {variable}")
            )
    if not (Path(_torch().__file__).parent / "include" / "torch" / "library.h").is_file():
        return "this torch has no C++ headers (torch/include), which the kernel's operators are built against"
    return ""


@functools.cache
def _library() -> str:
    """'' once the kernel's operators are registered (built on first use, once per machine), or why not."""
    torch = _torch()  # first: its OpenMP runtime (libgomp.so.1) is the one the kernel's parallel loop joins
    why = _why_not()
    if why:
        return why
    if hasattr(torch.ops.mixtral_notebooks, "int8_matmul"):
        return ""  # registered already (a cache folder changed within this process)
    compilers = (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++"))
    versions = [
        subprocess.run([c, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        for c in compilers
    ]
    key = [SOURCE.read_text(), OPS.read_text(), versions, FLAGS, cpuinfo("model name"), cpuinfo("flags")]
    key.append(torch.__version__)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"int8_kernel-{digest}.so"
    why = _build(compilers, Path(torch.__file__).parent, path)
    if not why:
        torch.ops.load_library(str(path))
    return why


def kernel_unavailable() -> str:
    """Why the kernel cannot run here ('' where it can; the first call builds it)."""
    return _library()


def operators():
    """`torch.ops.mixtral_notebooks`, whose int8_matmul and int8_experts are the kernel (int8_ops.cpp), or a
    RuntimeError saying why it cannot run here."""
    why = _library()
    if why:
        raise RuntimeError(f"the int8 kernel cannot run here: {why}")
    return _torch().ops.mixtral_notebooks


def int8_matmul(x, packed, scales):
    """x [T, K] (float32 or bf16) times int8 weights [N, K] held as `relayout(q)` with bf16 `scales` [N]
    (w = q * scale, as quantize.py stores them) -> [T, N] float32."""
    return operators().int8_matmul(x, packed, scales)


def int8_experts(x, packed, scales, chosen):
    """Row i of x [count or 1, K] (or its one row) times expert `chosen[i]` of a stack held as `relayout(q)`
    [E, ..] with bf16 `scales` [E, N], its weights read in place (not gathered) -> [count, N] float32."""
    return operators().int8_experts(x, packed, scales, chosen)
