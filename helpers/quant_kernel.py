"""int8 and int4 weights read near the memory's bandwidth on x86 CPUs: small C kernels of our own.

At decode shapes torch's CPU kernels for int8 and int4 weights (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) read them at a fraction of the bandwidth on some CPUs (`make bench-kernels`),
so fewer bytes did not make less time. quant_kernel.c reads the same values as one stream (their scales, and
int4's zeros, beside them), 4 rows to a 64-byte line (16 int8 inputs, or 32 int4 ones, a row), rounds each
token's activations to int16 (one scale a token: finer than bf16's 8-bit mantissa) and sums the products
exactly in int32 (int4: each group of 32 inputs, or each lane's part of it, times its scale). quant_ops.cpp makes it torch operators
(`operators()`: int8_matmul, int8_experts, int4_matmul, int4_experts), called as torch's own kernels are, from
Python or from a compiled graph. Both files are compiled here, once per machine, by the system's C and C++
compilers for this CPU (`-march=native`) against torch's headers, into the cache folder. Where they cannot be
(not x86-64 Linux, no AVX2 and FMA, no compiler), `kernel_unavailable()` says why and torch's kernels serve.
quantize.py measures both at load and keeps ours where torch's runs at under 90% of its speed, or where our layer
operator can take the model's step (`MIXTRAL_QUANT_KERNEL` forces one). Taught in 10_quantization.

The same files read dense weights as the model holds them (float32 or bf16, row by row, in place: dense_matmul,
dense_experts), summing in float32: one more candidate of the fast path's measured kernel choice
(fastpath.KERNELS, "our kernel"), taught in 08_performance.

Where the CPU has AVX-512 with VNNI, the same loops run on 512-bit vectors (4 tokens a pass where AVX2 takes 2);
MIXTRAL_KERNEL_ISA=avx2 builds the AVX2 ones instead, as on a CPU without AVX-512.

Shapes: T tokens, N outputs (a multiple of ROWS), K inputs (a multiple of COLS for int8, of GROUP for int4); the
dense kernels take any N and K.
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

from . import fitting
from .files import atomic_file, cache_root
from .hardware import cpuinfo

SOURCE = Path(__file__).with_name("quant_kernel.c")
OPS = Path(__file__).with_name("quant_ops.cpp")  # the kernels as torch operators
ROWS, COLS, GROUP = 4, 16, 32  # quant_kernel.c's blocks: 4 rows x 16 int8 or 32 int4 inputs, one 64-byte line
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
# MIXTRAL_KERNEL_ISA=avx2: the AVX2 kernels on an AVX-512 CPU too (read at a process's first use; a bad value raises)
ISAS = {"native": [], "avx2": ["-mno-avx512f"]}


def _flags() -> list:
    """FLAGS, and those of the instruction set $MIXTRAL_KERNEL_ISA names (default: all this CPU has)."""
    isa = os.environ.get("MIXTRAL_KERNEL_ISA", "").strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"MIXTRAL_KERNEL_ISA={isa!r}: give one of {', '.join(ISAS)}, or leave it unset")
    return [*FLAGS, *ISAS[isa]]


def fits(shape, scheme: str) -> bool:
    """Whether a weight [.., N, K] splits into the blocks of `scheme`'s kernel (int4: with fitting.GROUP's groups)."""
    inputs = COLS if scheme == "int8" else GROUP
    return shape[-2] % ROWS == 0 and shape[-1] % inputs == 0 and (scheme == "int8" or fitting.GROUP == GROUP)


def relayout8(q):
    """int8 [.., N, K] -> [.., N/ROWS, K/COLS, ROWS, COLS]: each block's 4 rows x 16 inputs side by side."""
    *lead, n, k = q.shape
    return q.reshape(*lead, n // ROWS, ROWS, k // COLS, COLS).transpose(-3, -2).contiguous()


def relayout4(q, scale, zero):
    """int4 values q [.., N, K] (0..15) with bf16 scales and zeros [.., N, K/GROUP] -> (packed [.., N/ROWS,
    K/GROUP, ROWS, 16] uint8, byte j of a block's row holding input j in its low half and j + 16 in its high
    half; scales [.., N/ROWS, K/GROUP, 2, ROWS] bf16, each block's 4 scales, then its 4 zeros)."""
    import torch

    *lead, n, k = q.shape
    blocks = q.reshape(*lead, n // ROWS, ROWS, k // GROUP, GROUP).transpose(-3, -2).to(torch.uint8)
    packed = (blocks[..., :16] | (blocks[..., 16:] << 4)).contiguous()
    both = torch.stack([scale, zero], -1).reshape(
        *lead, n // ROWS, ROWS, k // GROUP, 2
    )  # [.., N/4, 4, K/G, 2]
    return packed, both.permute(*range(len(lead)), -4, -2, -1, -3).contiguous().bfloat16()


def _compile(path: Path, compilers: tuple, torch_folder: Path) -> None:
    """quant_kernel.c by the C compiler, then quant_ops.cpp by the C++ compiler against torch's headers, linked
    into `path`; a RuntimeError with the failing compiler's first error line where one fails."""
    c, cxx = compilers
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(_torch()._C._GLIBCXX_USE_CXX11_ABI)}"
    lib, flags = torch_folder / "lib", _flags()
    steps = [
        (c, SOURCE, [c, *flags, "-c", str(SOURCE), "-o", f"{path}.o"]),
        (cxx, OPS, [cxx, *flags, "-std=c++20", abi, f"-I{torch_folder / 'include'}", str(OPS), f"{path}.o",
                    "-shared", "-o", str(path), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]),
    ]  # fmt: skip
    try:
        for compiler, source, command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                said = done.stderr.strip().splitlines() or ["(no message)"]
                first = next((line for line in said if "error" in line), said[-1])  # else its last line
                raise RuntimeError(f"{compiler} could not build {source.name}: {first}")
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


def _resolved(compiler: str) -> Path:
    """The file a compiler's name runs (links followed; a wrapper such as ccache is seen, not the compiler behind it)."""
    return Path(shutil.which(compiler) or compiler).resolve()


def _torch():
    import torch

    return torch


def _why_not() -> str:
    """Why the kernel cannot be built here, or ''."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"the kernel is written for x86-64 Linux, and this is {platform.system()} {platform.machine()}"
    if not {"avx2", "fma"} <= set(cpuinfo("flags").split()):
        return "this CPU has no AVX2 and FMA, which the kernels' instructions need"
    for variable, default, what, package in [("CC", "cc", "C", "gcc"), ("CXX", "c++", "C++", "g++")]:
        compiler = os.environ.get(variable, default)
        if not shutil.which(compiler):
            return (
                f"no {what} compiler ({compiler}) on PATH: install {package} (Debian: apt install {package}) or "
                f"set {variable}"
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
    if hasattr(torch.ops.mixtral_notebooks, "dense_experts"):
        return ""  # registered already (a cache folder changed within this process)
    compilers = (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++"))
    # each compiler as its file: a `--version` child started while a model is loaded records its memory (a build does)
    versions = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in map(_resolved, compilers)]
    key = [SOURCE.read_text(), OPS.read_text(), versions, _flags(), cpuinfo("model name"), cpuinfo("flags")]
    key.append(torch.__version__)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"quant_kernel-{digest}.so"
    why = _build(compilers, Path(torch.__file__).parent, path)
    if not why:
        torch.ops.load_library(str(path))
    return why


def source_digest() -> str:
    """The kernel's two sources and its compiler flags, hashed: what a measurement of its speed was made with."""
    built = SOURCE.read_bytes() + OPS.read_bytes() + " ".join(_flags()).encode()
    return hashlib.sha256(built).hexdigest()[:12]


def kernel_unavailable() -> str:
    """Why the kernel cannot run here ('' where it can; the first call builds it)."""
    return _library()


def operators():
    """`torch.ops.mixtral_notebooks`, whose int8_matmul, int8_experts, int4_matmul, int4_experts, dense_matmul and
    dense_experts are the kernels (quant_ops.cpp), or a RuntimeError saying why they cannot run here."""
    why = _library()
    if why:
        raise RuntimeError(f"our kernels cannot run here: {why}")
    return _torch().ops.mixtral_notebooks
