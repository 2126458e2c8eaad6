"""Decode runs measured tier by tier, side by side: what 11_offloading sets against each other.

`TierRuns(prompt)` holds runs by name, each (the best decode tok/s, the bytes each tier gave per decode
step: `OffloadMeter.per_token`); `str(runs)` is their table, in MiB per token.
"""

from __future__ import annotations

from .generation import generate
from .offload import OffloadMeter

TIERS_SHOWN = (("resident", 9), ("from RAM", 9), ("from disk", 10), ("storage", 8))  # column, width


class TierRuns(dict):
    """{name: (best tok/s, bytes per decode step by tier)} for one prompt, and their table.
    Taught in 11_offloading."""

    def __init__(self, prompt: str):
        super().__init__()
        self.prompt = prompt

    def measure(self, name: str, pipe, new_tokens: int, runs: int = 3, warm: bool = False) -> tuple:
        """Answer the prompt `runs` times after a short warm-up (none if `warm`: the model has just run), each
        tier's bytes counted; keep the best speed, because on a shared machine noise only slows a run down."""
        if not warm:
            generate(pipe, self.prompt, max_new_tokens=4, seed=0)
        with OffloadMeter(pipe.model) as meter:
            speeds = [
                generate(pipe, self.prompt, max_new_tokens=new_tokens, seed=0).tokens_per_second
                for _ in range(runs)
            ]
        self[name] = (max(speeds), meter.per_token())
        return self[name]

    def __str__(self) -> str:
        head = " ".join(f"{k:>{w}}" for k, w in TIERS_SHOWN)
        lines = [f"{'':>34} {'tok/s':>6} {head}   (MiB per token)"]
        for name, (speed, tiers) in self.items():
            cells = " ".join(f"{tiers.get(k, 0) / 2**20:>{w}.0f}" for k, w in TIERS_SHOWN)
            lines.append(f"{name:>34} {speed:>6.1f} {cells}")
        return "\n".join(lines)
