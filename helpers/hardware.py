"""What this machine is: torch build, devices, memory, and which models it can hold."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from .data import DTYPE_ENV, GiB, whole_number


def system_memory() -> dict:
    """Total and available RAM in bytes (Linux /proc/meminfo; a sysconf fallback elsewhere)."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return {"total": info["MemTotal"], "available": info.get("MemAvailable", info["MemFree"])}
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"total": total, "available": total}


def gpus() -> list[dict]:
    """Each visible GPU (ROCm GPUs appear through torch.cuda too) with its memory in bytes."""
    import torch

    if not torch.cuda.is_available():
        return []
    rows = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        rows.append({"index": i, "name": torch.cuda.get_device_name(i), "total": total, "free": free})
    return rows


def cpuinfo(field: str) -> str:
    """The value of the first `field` line ("flags", "model name") of Linux's /proc/cpuinfo; "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith(field) and ":" in line), ""
            )
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated:
    arithmetic-bound work (the prompt pass) gets slower than in fp32 (08_performance measures by how much)."""
    return any(flag in cpuinfo("flags").split() for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Machine:
    """What this machine is, as `this_machine()` reads it (afresh on each call): the torch build (ROCm builds
    set torch.version.hip, CUDA builds torch.version.cuda), the GPUs torch sees, the RAM, and two facts about
    the CPU that later notebooks use. Bytes throughout; `print` shows them in GiB (the cache in MiB)."""

    torch: str
    backend: str  # "ROCm 6.4", "CUDA 12.8" or "CPU only"
    python: str
    gpus: tuple  # each visible GPU: {"index", "name", "total", "free"}
    memory_total: int
    memory_available: int
    native_bf16: bool  # bf16 instructions (AVX512-BF16 or AMX); the dtype is measured all the same
    last_level_cache: int  # the largest CPU cache the OS reports: timed buffers must be larger

    def __str__(self) -> str:
        lines = [
            f"torch {self.torch} ({self.backend}), Python {self.python}",
            f"RAM: {self.memory_total / GiB:.1f} GiB total, {self.memory_available / GiB:.1f} GiB available",
            f"CPU: bf16 instructions {'yes' if self.native_bf16 else 'no'}, "
            f"largest cache it reports {self.last_level_cache / 2**20:.0f} MiB",
        ]
        lines += [
            f"GPU {g['index']}: {g['name']}, {g['total'] / GiB:.1f} GiB ({g['free'] / GiB:.1f} GiB free)"
            for g in self.gpus
        ] or ["No GPU visible: models run on the CPU."]
        return "\n".join(lines)


def this_machine() -> Machine:
    """This machine as torch sees it: build, GPUs, memory, CPU. Taught in 00_setup."""
    import torch

    if getattr(torch.version, "hip", None):
        backend = f"ROCm {torch.version.hip}"
    elif torch.version.cuda:
        backend = f"CUDA {torch.version.cuda}"
    else:
        backend = "CPU only"
    memory = system_memory()
    return Machine(
        torch=torch.__version__,
        backend=backend,
        python=platform.python_version(),
        gpus=tuple(gpus()),
        memory_total=memory["total"],
        memory_available=memory["available"],
        native_bf16=cpu_has_native_bf16(),
        last_level_cache=last_level_cache_bytes(),
    )


def dtype_name(dtype) -> str:
    """A torch dtype as the notebooks and $MIXTRAL_DTYPE write it: "bfloat16" for torch.bfloat16.
    Taught in 00_setup."""
    return str(dtype).replace("torch.", "")


DTYPE_CHOICES = {
    "": None,
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def gpu_dtype():
    """On a GPU, the dtype it computes best: the blog's bfloat16, or float16 on a GPU without bf16. Returns
    (torch dtype, reason), or None on a CPU (where fastpath.pick_dtype measures instead)."""
    import torch

    if not torch.cuda.is_available():
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, "GPU with bf16 support: the blog's dtype"
    return torch.float16, "GPU without bf16: float16 instead"


def forced_dtype():
    """$MIXTRAL_DTYPE as (torch dtype, reason), or None when it is unset or "auto". It lets one machine run what
    another kind of machine would pick."""
    import torch

    chosen = os.environ.get(DTYPE_ENV, "").strip().lower()
    if chosen not in DTYPE_CHOICES:
        raise ValueError(
            f"{DTYPE_ENV}={os.environ[DTYPE_ENV]!r} is not a dtype these notebooks load: use one of "
            f"float32, bfloat16, float16, or auto (or unset it) for this hardware's choice"
        )
    if not DTYPE_CHOICES[chosen]:
        return None
    dtype = getattr(torch, DTYPE_CHOICES[chosen])
    return dtype, f"{DTYPE_ENV}={chosen}: {dtype_name(dtype)} forced"


def memory_budget() -> dict:
    """Bytes that device_map="auto" can fill: free GPU memory plus available RAM."""
    gpu_free, ram = sum(g["free"] for g in gpus()), system_memory()["available"]
    return {"gpu": gpu_free, "cpu": ram, "total": gpu_free + ram}


def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (Linux sysfs), or 32 MiB where it reports none: a buffer
    that is to be read from memory, not from a cache, must be larger than this."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=32 * 2**20)


def timing_buffer_bytes() -> int:
    """Bytes a timing cycles over so that its weights come from memory: twice the last-level cache,
    at least 256 MiB."""
    return max(2 * last_level_cache_bytes(), 256 * 2**20)


def cores_busy_elsewhere(run) -> tuple:
    """(run()'s result, the cores other work kept busy while it ran, on average): all the CPU time the system
    reports (/proc/stat, the hypervisor's steal included) less this process's own, over the wall time. None for
    the cores where it cannot be told: the system does not report it (no /proc/stat), or `run` took under half a
    second, too short beside the 10 ms ticks the system counts in."""

    def system_busy():  # seconds of CPU time spent by anything, all cores, since boot
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    before, mine, start = system_busy(), time.process_time(), time.perf_counter()
    result = run()
    after, mine, wall = system_busy(), time.process_time() - mine, time.perf_counter() - start
    if before is None or after is None or wall < 0.5:
        return result, None
    return result, max(0.0, (after - before - mine) / wall)


def best_seconds(run, rounds: int = 3, repeats: int = 1, sync=None) -> float:
    """Seconds per `run()`: the least disturbed of `rounds` timings of `repeats` calls in a row (with
    `sync()` after them on a GPU). The one timer for kernels and memory passes."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        if sync is not None:
            sync()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def measure_bandwidth(mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in bytes/s as torch sees it (all its threads): the best of `repeats`
    sums over a float32 buffer far larger than the caches. Taught in 08_performance."""
    import torch

    whole_number("mib", mib, 64, " (MiB), so the buffer does not fit in the caches")
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else None
    x.sum()  # the first pass pays for the pages
    return x.numel() * 4 / best_seconds(x.sum, rounds=repeats, sync=sync)
