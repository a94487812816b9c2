"""Bounded memory by passes: which networks each pass over the audio accumulates.

Every pair metric of networks a and b needs only the blocks C_aa, C_bb and C_ab of the joint
co-moment. When the statistics of all networks exceed the memory budget, the networks are cut
into G groups (in column order, so a model's layers stay together and a pass runs few
models) small enough that two groups fit, and pass (i, j), i < j, accumulates the joint
statistics of groups i and j: G(G − 1)/2 passes. Pass (i, j) gives the pairs across groups i
and j, and the pairs within group i when j = i + 1 (within the last group: its pass with the
one before). Each cross block is computed once, so the Gram flops are those of one
pass; the forward passes grow with the number of passes. The tables equal the one-pass tables.

Memory of a pass, float32, per device: 4·W²·(1 + B + 3)/S bytes for W neurons in its
statistics, B bootstrap replicates, S stat shards (the three extra copies are the batch's
rows, the merge and the metrics' temporaries; `statistics_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from sslsim_jax.analysis.settings import AnalysisError
from sslsim_jax.memory import device_memory, format_bytes

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int | float | None) -> int | None:
    """Bytes of ``"16G"``, ``"500M"``, ``"1.5T"``, ``"1000000"`` (binary units); None stays
    None. Errors name ``max_memory``."""
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
        if not match:
            raise AnalysisError(
                f"expected a size such as 16G, 500M or 2000000000, got {text!r}",
                argument="max_memory",
            )
        value, unit = float(match.group(1)), match.group(2).upper()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise AnalysisError(f"expected a positive size, got {text!r}", argument="max_memory")
    return int(size)


def statistics_bytes(width: int, *, bootstrap: int = 0, shards: int = 1) -> int:
    """Bytes per device of joint statistics over ``width`` neurons (module docstring)."""
    return int(4 * width**2 * (1 + bootstrap + 3) / shards)


def memory_limit(device) -> tuple[int, str]:
    """(bytes, description) of the memory one device of the mesh can use: an accelerator's
    limit, or on CPU the host's (cgroup, ulimit and RAM, `sslsim_jax.memory.available_memory`)
    split over the CPU devices."""
    return device_memory(device)


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass over the audio.

    Attributes:
        groups: (i, j), the network groups whose joint statistics it accumulates (i < j; (0, 0)
            when everything fits in one pass).
        networks: the global indices of its networks, in column order.
        bytes: its statistics' memory per device (`statistics_bytes`).
    """

    groups: tuple[int, int]
    networks: tuple[int, ...]
    bytes: int

    def owns(self, group_of: Sequence[int], a: int, b: int) -> bool:
        """Whether the pair (a, b) of global networks is this pass's to report: pairs across
        its two groups, and the pairs within group g when it is g's first pass (g, g + 1), or
        the last group's pass (g − 1, g)."""
        ga, gb = sorted((group_of[a], group_of[b]))
        if ga != gb:
            return (ga, gb) == self.groups
        i, j = self.groups
        last = max(group_of)
        return (ga == i and (j == i + 1 or i == j)) or (ga == j == last and i == j - 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The passes of an analysis under a memory budget.

    Attributes:
        groups: the global network indices of each group.
        passes: the passes, (0, 1), (0, 2), …, (1, 2), … (consecutive passes share group i).
        budget: the budget in bytes per device.
    """

    groups: tuple[tuple[int, ...], ...]
    passes: tuple[Pass, ...]
    budget: int

    @property
    def group_of(self) -> list[int]:
        out = [0] * sum(len(g) for g in self.groups)
        for i, group in enumerate(self.groups):
            for n in group:
                out[n] = i
        return out

    def describe(self, names: Sequence[str], model_of: Sequence[str]) -> str:
        """A few lines for people: groups, passes, bytes per pass and the models each runs."""
        lines = [
            f"plan: {len(names)} networks in {len(self.groups)} group(s), "
            f"{len(self.passes)} pass(es) over the audio, budget {format_bytes(self.budget)} "
            "per device"
        ]
        for i, group in enumerate(self.groups):
            lines.append(f"  group {i}: {names[group[0]]} … {names[group[-1]]} ({len(group)})")
        forwards = 0
        for p in self.passes:
            models = list(dict.fromkeys(model_of[n] for n in p.networks))
            forwards += len(models)
            lines.append(
                f"  pass {p.groups}: {len(p.networks)} networks, {format_bytes(p.bytes)}, "
                f"runs {', '.join(models)}"
            )
        lines.append(f"  forward passes over the audio: {forwards} (one model each)")
        return "\n".join(lines)

    def record(self) -> dict:
        """JSON-ready, for run.json."""
        return {
            "budget_bytes": self.budget,
            "groups": [list(g) for g in self.groups],
            "passes": [
                {"groups": list(p.groups), "networks": len(p.networks), "bytes": p.bytes}
                for p in self.passes
            ],
        }


def plan_passes(sizes: Sequence[int], *, budget: int, bootstrap: int = 0, shards: int = 1) -> Plan:
    """Groups the networks (widths ``sizes``, column order) so each pass fits ``budget``.

    One group (one pass) when everything fits. Otherwise groups are filled greedily in column
    order up to half of the widest statistics that fit, so any two of them fit together.

    Raises:
        AnalysisError: naming ``max_memory``, when even one pair of the widest networks
            cannot fit.
    """
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ValueError("expected at least one network")
    cost = lambda width: statistics_bytes(width, bootstrap=bootstrap, shards=shards)  # noqa: E731
    total = sum(sizes)
    if cost(total) <= budget:
        everything = tuple(range(len(sizes)))
        return Plan((everything,), (Pass((0, 0), everything, cost(total)),), budget)
    widest = sorted(sizes)[-2:] if len(sizes) > 1 else sizes
    if cost(sum(widest)) > budget:
        raise AnalysisError(
            f"one pair of networks ({sum(widest)} neurons, bootstrap {bootstrap}) needs "
            f"{format_bytes(cost(sum(widest)))} per device, more than the budget of "
            f"{format_bytes(budget)}: raise it, keep fewer replicates or split the statistics "
            "over devices (stat_shards)",
            argument="max_memory",
        )
    # The widest W with cost(W) <= budget. A group holds at most min(W/2, W − the widest
    # network) neurons, or one network: then any two groups fit together (the widest pair was
    # checked above).
    limit = int(math.isqrt(int(budget * shards / (4 * (4 + bootstrap)))))
    capacity = min(limit // 2, limit - max(sizes))
    # As many groups as that needs, filled evenly rather than leaving a small last group.
    count = math.ceil(total / capacity)
    capacity = min(capacity, math.ceil(total / count) + max(sizes) // 2)
    groups, current, width = [], [], 0
    for n, size in enumerate(sizes):
        if current and width + size > capacity:
            groups.append(tuple(current))
            current, width = [], 0
        current.append(n)
        width += size
    groups.append(tuple(current))
    # Every pair of groups once; the pairs within a group come with one of its passes, so no
    # pass holds a single group: G(G − 1)/2 passes.
    passes = []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            networks = tuple(sorted(groups[i] + groups[j]))
            passes.append(Pass((i, j), networks, cost(sum(sizes[n] for n in networks))))
    return Plan(tuple(groups), tuple(passes), budget)
