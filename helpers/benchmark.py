"""The benchmark run that 08_performance and 10_quantization share, as typed rows.

`notebook_bench(tokens)` runs `benchmarks/bench.py --notebooks` in a process of its own (the harness is
tooling, not the package), its progress shown as it comes; the run measures the eight configurations the
two notebooks show once, and the other notebook, within the hour, reads the same run again (bench.py says
when it reuses one). What comes back is one `BenchRow` per configuration, by name, and where the table and
the picture were written.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from .files import ROOT, run_shown

NOTEBOOK_RUN = ROOT / "build" / "bench-notebooks"  # bench.json, bench.md, bench.png


@dataclass(frozen=True)
class BenchRow:
    """One configuration's figures from one run (decode speeds after the first token, bytes read per token)."""

    name: str
    decode_tok_s: float  # tokens per second after the first token: one sequence's, or a batch's in all
    throughput_tok_s: float  # all sequences' new tokens per second of wall time
    bytes_per_token: float  # what one decode step reads per sequence
    ceiling_tok_s: float  # this machine's measured bandwidth / bytes_per_token
    efficiency: float  # decode_tok_s / ceiling_tok_s
    ttft_s: float  # time to first token: the prompt pass
    dtype: str
    device: str
    batch: int
    kernels: dict  # what the fast path measured for each kind: {kind: {"gb_s": {kernel: GB/s}, "chosen", "nbytes"}}
    matvec_ceiling_tok_s: float | None  # the decode speed each kind of weight at its best kernel speed allows
    step: dict | None  # the bench harness's step_profile: where one decode step's time goes (one sequence)
    graph: dict | None  # what choose_step measured at this row's load (None where nothing was raced)


@dataclass(frozen=True)
class BenchRun:
    """A finished run: its rows by configuration name, the machine, and the files it wrote."""

    rows: dict
    machine: str
    bandwidth: float  # bytes/s, this machine's measured memory bandwidth
    folder: Path
    sampler: dict  # {"vocabulary", "ms": {"transformers", "fast path"}}: choosing one sampled token's scores

    def markdown(self) -> str:
        """The run's table and summary, as bench.md holds them."""
        return (self.folder / "bench.md").read_text()

    @property
    def picture(self) -> Path:
        return self.folder / "bench.png"


def notebook_bench(tokens: int = 24, warmup: int = 2) -> BenchRun:
    """Run (or reuse, within the hour) the benchmark run 08 and 10 share, `tokens` new tokens per
    configuration; a RuntimeError that says what failed if a configuration did. Taught in 08_performance."""
    out = os.path.relpath(NOTEBOOK_RUN, ROOT)  # run from ROOT: what the run prints names no machine's path
    command = [sys.executable, "benchmarks/bench.py", "--notebooks", "--out", out]
    command += ["--tokens", str(tokens), "--warmup", str(warmup)]
    status, _ = run_shown(command, sys.stdout)  # shown as it comes: the run takes minutes
    if status != 0:
        raise RuntimeError(
            f"the benchmark run failed (exit {status}; its output is above): "
            f"run `python benchmarks/bench.py --notebooks --tokens {tokens}` to see it again"
        )
    result = json.loads((NOTEBOOK_RUN / "bench.json").read_text())
    names = [f.name for f in fields(BenchRow)]
    rows = {r["name"]: BenchRow(**{k: r[k] for k in names}) for r in result["rows"]}
    return BenchRun(
        rows=rows,
        machine=result["machine"],
        bandwidth=result["bandwidth"],
        folder=NOTEBOOK_RUN,
        sampler=result["sampler"],
    )
