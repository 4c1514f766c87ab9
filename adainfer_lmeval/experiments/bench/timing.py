"""How both benchmarks time passes and read speedups off them.

A pass is timed between device synchronisations; the variants of one comparison run
interleaved (the order rotates every repeat, so no variant always runs first, on a cold cache
or after a slow neighbour); ratios are paired per repeat and their median reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Hashable, Iterable

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device="cpu") -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


def rotation(items: list, rep: int) -> list:
    """``items`` starting at ``rep`` (mod their count): each leads one repeat in turn."""
    k = rep % len(items)
    return items[k:] + items[:k]


def time_interleaved(passes: dict[Hashable, Callable[[], Any]], repeats: int, device="cpu",
                     order: Callable[[int], list] | None = None,
                     watch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     after_repeat: Callable[[int, dict], None] | None = None) -> tuple[dict, dict]:
    """Every pass once per repeat, in ``order(rep)`` (default: ``passes`` rotated by ``rep``).

    ``watch()`` wraps each timed pass (e.g. a CPU monitor's interval); ``after_repeat(rep, times)``
    runs after each repeat. Returns the seconds per key, one per repeat, and each key's first result.
    """
    order = order or (lambda rep: rotation(list(passes), rep))
    times: dict[Hashable, list[float]] = {key: [] for key in passes}
    first: dict[Hashable, Any] = {}
    for rep in range(repeats):
        for key in order(rep):
            with watch():
                seconds, out = timed(passes[key], device)
            times[key].append(seconds)
            first.setdefault(key, out)
        if after_repeat is not None:
            after_repeat(rep, times)
    return times, first


def paired_ratio(numerators: Iterable[float], denominators: Iterable[float]) -> float:
    """The median of per-repeat ratios (each pair ran in the same repeat, close in time)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def ideal_speedup(records) -> float:
    """Full-depth FLOPs over the FLOPs executed (exit checks included), from exit records."""
    return sum(r.full_flops for r in records) / sum(r.flops for r in records)


def mean_layers(records) -> float:
    return sum(r.layers for r in records) / len(records)


def speedups(times: list[float], full_times: list[float], ideal: float) -> dict:
    """Measured speedup against ``policy=full`` (paired per repeat) and its share of the ideal."""
    measured = paired_ratio(full_times, times)
    return {"measured_speedup": measured, "measured_over_ideal": measured / ideal}


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """torch's benchmark Timer (it synchronises CUDA itself) for short calls: the median of its blocks."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median
