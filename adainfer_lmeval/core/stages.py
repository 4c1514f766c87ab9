"""Named stages of the early-exit forward pass, for profiling; free when nothing listens.

The engine and the exit checks mark their stages with ``with stage("layers"):`` (embed,
layer_inputs, layers, check_head, check_features, check_continuation, exit_continuation, emit;
the backend marks engine_run). With no
:class:`StageClock` running, :func:`stage` hands back one shared do-nothing context: a global
read and a call per stage, nothing measured. Inside ``with StageClock() as clock:`` each stage
adds its wall-clock seconds, its calls and its rows to ``clock``. Stages are marked where they
do not nest, except engine_run, which holds the others. ``StageClock(labels=True)``
also opens a ``torch.profiler.record_function`` per stage, so ``torch.profiler`` traces show them.

One clock at a time, in one thread: profiling is a measuring run's business, not a server's.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

_OFF = nullcontext()
_clock: "StageClock | None" = None


def stage(name: str, rows: int = 0):
    """The context of stage ``name`` (``rows``: the rows it handles, counted when timed)."""
    clock = _clock
    return _OFF if clock is None else clock._timed(name, rows)


class StageClock:
    def __init__(self, labels: bool = False):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.labels = labels

    def __enter__(self) -> "StageClock":
        global _clock
        if _clock is not None:
            from adainfer_lmeval.errors import AdaInferError

            raise AdaInferError("a StageClock is already running; time one pass at a time")
        _clock = self
        return self

    def __exit__(self, *exc) -> bool:
        global _clock
        _clock = None
        return False

    def _timed(self, name: str, rows: int):
        return _Timed(self, name, rows)


class _Timed:
    __slots__ = ("clock", "name", "rows", "started", "label")

    def __init__(self, clock: StageClock, name: str, rows: int):
        self.clock, self.name, self.rows, self.label = clock, name, rows, None

    def __enter__(self):
        if self.clock.labels:
            from torch.profiler import record_function

            self.label = record_function(self.name)
            self.label.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        elapsed = time.perf_counter() - self.started
        if self.label is not None:
            self.label.__exit__(*exc)
        clock, name = self.clock, self.name
        clock.seconds[name] = clock.seconds.get(name, 0.0) + elapsed
        clock.calls[name] = clock.calls.get(name, 0) + 1
        clock.rows[name] = clock.rows.get(name, 0) + self.rows
        return False
