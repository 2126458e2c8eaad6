"""int8 weights read near the memory's bandwidth on x86 CPUs: a small C kernel of our own (int8_kernel.c).

At decode shapes torch's CPU kernel for int8 weights (`_weight_int8pack_mm`) reads them at a fraction of
the bandwidth on some CPUs (`make bench-kernels`), so a quarter of the bytes did not make a quarter of
the time. int8_kernel.c reads the same int8 values and scales as one stream (4 rows x 16 inputs to a
64-byte line), rounds each token's activations to int16 (one scale a token: finer than bf16's 8-bit
mantissa) and sums the products exactly in int32. It is compiled here, once per machine, by the system's
C compiler for this CPU (`-march=native`), into the cache folder. Where it cannot be (not x86-64 Linux, no
AVX2, no compiler), `kernel_unavailable()` says why and torch's kernel serves. quantize.py measures both
at load and uses the faster (`MIXTRAL_INT8_KERNEL` forces one). Taught in 10_quantization.

Shapes: T tokens, N outputs (a multiple of ROWS), K inputs (a multiple of COLS).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .files import atomic_file, cache_root
from .hardware import cpuinfo

SOURCE = Path(__file__).with_name("int8_kernel.c")
ROWS, COLS = 4, 16  # int8_kernel.c's block: 4 rows x 16 inputs, one 64-byte line
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
PROFILED = "int8_kernel.c"  # the name its calls have in a torch.profiler profile


def fits(shape) -> bool:
    """Whether a weight [.., N, K] splits into the kernel's blocks."""
    return shape[-2] % ROWS == 0 and shape[-1] % COLS == 0


def relayout(q):
    """int8 [.., N, K] -> [.., N/ROWS, K/COLS, ROWS, COLS]: each block's 4 rows x 16 inputs side by side."""
    *lead, n, k = q.shape
    return q.reshape(*lead, n // ROWS, ROWS, k // COLS, COLS).transpose(-3, -2).contiguous()


def _build(compiler: str, path: Path) -> str:
    """Compile int8_kernel.c into `path` (atomically, one process at a time); '' or why it failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return ""
        failed = []

        def compile_to(tmp):
            done = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True
            )
            if done.returncode:
                failed.append((done.stderr.strip().splitlines() or ["(no message)"])[-1])
                raise RuntimeError  # atomic_file removes the half-written file

        try:
            atomic_file(path, compile_to)
        except RuntimeError:
            return f"{compiler} could not build {SOURCE.name}: {failed[0] if failed else 'it stopped'}"
    return ""


@functools.cache
def _library() -> tuple:
    """(the kernel's C functions {name: function}, '') or (None, why not): built on first use, once per machine."""
    import ctypes

    import torch  # first: its OpenMP runtime (libgomp.so.1) is the one the kernel's parallel loop joins

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return (
            None,
            f"the kernel is written for x86-64 Linux, and this is {platform.system()} {platform.machine()}",
        )
    if "avx2" not in cpuinfo("flags").split():
        return None, "this CPU has no AVX2, which the kernel's instructions need"
    compiler = os.environ.get("CC", "cc")
    if not shutil.which(compiler):
        return None, f"no C compiler ({compiler}) on PATH: install gcc (Debian: apt install gcc) or set CC"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = [SOURCE.read_text(), version, FLAGS, cpuinfo("model name"), cpuinfo("flags"), torch.__version__]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"int8_kernel-{digest}.so"
    why = _build(compiler, path)
    if why:
        return None, why
    library, pointer, number, long = ctypes.CDLL(str(path)), ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    functions = {"int8_matmul": library.int8_matmul, "int8_experts": library.int8_experts}
    functions["int8_matmul"].argtypes = [pointer] * 4 + [number] * 3
    # int8_experts(q, scale, q_stride, experts, chosen, count, x, x_rows, y, N, K), as int8_kernel.c declares it
    functions["int8_experts"].argtypes = [pointer, pointer, long, number, pointer, number, pointer, number, pointer, number, number]  # fmt: skip
    for function in functions.values():
        function.restype = number
    return functions, ""


def kernel_unavailable() -> str:
    """Why the kernel cannot run here ('' where it can; the first call builds it)."""
    return _library()[1]


def _call(name: str, *arguments) -> None:
    """Call the kernel's C function `name`, naming its time in a torch.profiler profile (harness.step_profile)."""
    import torch

    functions, why = _library()
    if functions is None:
        raise RuntimeError(f"the int8 kernel cannot run here: {why}")
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(PROFILED):
            failed = functions[name](*arguments)
    else:
        failed = functions[name](*arguments)
    if failed == -1:
        raise MemoryError(f"{name}: no memory for the int16 activations")
    if failed:
        raise IndexError(f"{name}: an expert index is out of range")


def _refuse(name: str, packed, scales, x, shape: tuple) -> None:
    """A ValueError unless the weights [.., N, K] = `shape` are held as the kernel reads them, before C reads them."""
    import torch

    *lead, n, k = shape
    if (
        (packed.dtype, scales.dtype) != (torch.int8, torch.bfloat16)
        or tuple(scales.shape) != (*lead, n)
        or packed.numel() != math.prod(shape)
        or not (packed.is_contiguous() and scales.is_contiguous() and fits((n, k)))
    ):
        raise ValueError(
            f"{name}: weights {list(packed.shape)} {packed.dtype} with {list(scales.shape)} {scales.dtype} scales do "
            f"not match inputs {list(x.shape)}: hold them as relayout(q) (int8, contiguous) with one bf16 scale a row"
        )


def int8_matmul(x, packed, scales):
    """x [T, K] (any float dtype) times int8 weights [N, K] held as `relayout(q)` with bf16 `scales` [N]
    (w = q * scale, as quantize.py stores them) -> [T, N] float32."""
    import torch

    x = x.float().contiguous()  # held here while the kernel reads it
    (t, k), n = x.shape, scales.shape[-1]
    _refuse("int8_matmul", packed, scales, x, (n, k))
    y = torch.empty(t, n)
    if t:
        _call("int8_matmul", packed.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), t, n, k)
    return y


def int8_experts(x, packed, scales, chosen):
    """Row i of x [count or 1, K] (or its one row) times expert `chosen[i]` of a stack held as `relayout(q)`
    [E, ..] with bf16 `scales` [E, N], its weights read in place (not gathered) -> [count, N] float32."""
    import torch

    x, chosen = x.float().contiguous(), chosen.to(torch.int64).contiguous()
    (rows, k), (e, n), count = x.shape, scales.shape, len(chosen)
    _refuse("int8_experts", packed, scales, x, (e, n, k))
    if rows not in (1, count):
        raise ValueError(
            f"int8_experts: {rows} rows of inputs for {count} experts: give one row, or one for each expert"
        )
    y = torch.empty(count, n)
    if count:
        arguments = (
            packed.data_ptr(),
            scales.data_ptr(),
            n * k,
            e,
            chosen.data_ptr(),
            count,
            x.data_ptr(),
            rows,
        )
        _call("int8_experts", *arguments, y.data_ptr(), n, k)
    return y


@functools.cache
def register_graph_ops():
    """Our kernel as two torch operators that torch.compile calls as it calls a library's kernel (opaque to
    it), for decode.graph_step: `torch.ops.mixtral_notebooks.int8_matmul(x, packed, scales)` and
    `.int8_experts(x, packed, scales, chosen)`, row i of `x` (or its one row) times expert `chosen[i]` of a
    stack [E, ..] (its weights read in place, not gathered). Both return float32. Registered as a plain CPU
    kernel (`torch.library.Library`): a call costs a few microseconds, where `custom_op`'s wrapper costs more
    than the kernel at these sizes. Returns the library, which must live as long as its operators."""
    import torch

    def outputs(x, packed, scales, chosen=None):  # what the compiler is told each returns
        return x.new_empty(len(x) if chosen is None else len(chosen), scales.shape[-1], dtype=torch.float32)

    library = torch.library.Library("mixtral_notebooks", "DEF")
    for name, function, schema in [
        ("int8_matmul", int8_matmul, "(Tensor x, Tensor packed, Tensor scales) -> Tensor"),
        ("int8_experts", int8_experts, "(Tensor x, Tensor packed, Tensor scales, Tensor chosen) -> Tensor"),
    ]:
        library.define(name + schema)
        library.impl(name, function, "CPU")
        torch.library.register_fake(f"mixtral_notebooks::{name}", outputs, lib=library)
    return library
