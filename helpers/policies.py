"""Which expert an expert cache evicts, and how often a policy would have found what the router chose:
LRU (what offload.py's cache runs live), LFU, and Belady's optimal policy, which needs the future and so only
runs replayed over a recorded trace (`hit_rates`). 11_offloading compares them."""

from __future__ import annotations

from collections import Counter, OrderedDict


class LRU:
    """Which expert sits in which of `capacity` slots, least recently used first. A full cache gives a newcomer
    the slot of `victim()`; the policies below choose it otherwise. (`future`: the uses to come, which only
    Belady's policy reads.)"""

    def __init__(self, capacity: int, future=None):
        self.capacity, self.slots = capacity, OrderedDict()  # expert -> slot

    def touch(self, expert: int) -> tuple[bool, int]:
        """(hit, slot): a miss takes a free slot, or the victim's."""
        if expert in self.slots:
            self.slots.move_to_end(expert)
            return True, self.slots[expert]
        slot = len(self.slots) if len(self.slots) < self.capacity else self.slots.pop(self.victim())
        self.slots[expert] = slot
        return False, slot

    def victim(self) -> int:
        return next(iter(self.slots))  # the least recently used


class LFU(LRU):
    """Evicts the expert used least often so far (every use counted, resident or not); ties go to the least
    recently used."""

    def __init__(self, capacity: int, future=None):
        super().__init__(capacity)
        self.uses = Counter()

    def touch(self, expert: int) -> tuple[bool, int]:
        self.uses[expert] += 1
        return super().touch(expert)

    def victim(self) -> int:
        return min(self.slots, key=self.uses.__getitem__)  # min keeps the first of a tie: the least recent


class Belady(LRU):
    """The optimal policy (Belady, 1966), which no cache can run live: it knows the layer's `future` uses and
    evicts the expert whose next use is furthest away, or never comes. Its hit rate bounds every policy's."""

    def __init__(self, capacity: int, future):
        super().__init__(capacity)
        self.future, self.now = list(future), 0

    def touch(self, expert: int) -> tuple[bool, int]:
        if self.future[self.now] != expert:
            raise ValueError(
                f"use {self.now} is expert {self.future[self.now]} in the future given, not {expert}"
            )
        self.now += 1
        return super().touch(expert)

    def victim(self) -> int:
        def next_use(resident):
            return next(
                (i for i in range(self.now, len(self.future)) if self.future[i] == resident), len(self.future)
            )

        return max(self.slots, key=next_use)


POLICIES = {"LRU": LRU, "LFU": LFU, "Belady": Belady}


def hit_rates(traces, capacities=None, num_experts: int = 8, policy: str = "LRU") -> dict:
    """Replay router traces (`trace_generation`'s, one per prompt) through a per-layer cache of each size run
    by `policy` (LRU, LFU or Belady): {C: hit rate over the decode steps}. Each trace starts empty, its prompt
    pass fills the cache uncounted; each forward touches its distinct experts in ascending order, as
    `cached_experts` does. Taught in 11_offloading."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: use one of {', '.join(POLICIES)}")
    rates = {}
    for capacity in capacities or range(1, num_experts + 1):
        hits = uses = 0
        for trace in traces:
            layers = [[] for _ in trace.calls[0]] if trace.calls else []  # per layer: (step, expert) in order
            for step, call in enumerate(trace.calls):
                for used, (indices, _, _) in zip(layers, call):
                    used += [(step, expert) for expert in sorted(set(indices.flatten().tolist()))]
            for used in layers:
                cache = POLICIES[policy](capacity, [expert for _, expert in used])
                for step, expert in used:
                    hit, _ = cache.touch(expert)
                    hits, uses = hits + (hit and step > 0), uses + (step > 0)
        rates[capacity] = hits / uses if uses else float("nan")
    return rates
