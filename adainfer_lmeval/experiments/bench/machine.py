"""The machine a benchmark ran on: how loaded it was, and what a report records about the run.

Timing on a shared CPU: OpenMP threads spin badly when the cores are oversubscribed, so the
benchmark waits for a quiet machine and records, per timed pass, the load average and the CPU
time other processes took.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

OTHERS_QUIET = 0.25  # cores other processes may use during the timed passes for "quiet"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_until_quiet(max_load: float, minutes: float, poll_s: float = 30.0, log=print) -> dict:
    """Poll the 1-minute load average until it is below ``max_load`` (or ``minutes`` pass)."""
    started = time.time()
    samples = [loadavg()]
    while not samples[-1] < max_load and time.time() - started < 60 * minutes:
        log(f"[benchmark] load {samples[-1]:.2f} >= {max_load}; waiting ({(time.time() - started) / 60:.1f}/{minutes} min)")
        time.sleep(poll_s)
        samples.append(loadavg())
    quiet = samples[-1] < max_load
    return {"quiet": quiet, "waited_s": round(time.time() - started, 1), "load_at_start": samples[-1],
            "max_load": max_load}


class CpuMonitor:
    """CPU time used by *other* processes (in cores) while we measure: /proc/stat minus our own.

    The load average counts our own busy threads too, so it cannot tell whether someone else
    competed for the cores during a measurement; this can. The load average at the start of
    each interval is kept beside it.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.samples: list[float] = []
        self.loads: list[float] = []

    @staticmethod
    def _busy_jiffies() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle

    @staticmethod
    def _own_jiffies() -> int:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[11]) + int(stat[12])  # utime + stime (all threads)

    def _snap(self):
        try:
            return time.perf_counter(), self._busy_jiffies(), self._own_jiffies()
        except (OSError, ValueError, IndexError):
            return None

    @contextlib.contextmanager
    def interval(self):
        """Around one timed pass: the load at its start, and the cores others kept busy during it.

        Only intervals of at least 0.5 s count: /proc/stat ticks are 10 ms, so a shorter one
        reads as noise (one stray tick over 1 ms is "10 cores").
        """
        self.loads.append(loadavg())
        start = self._snap()
        yield
        end = self._snap()
        if start is not None and end is not None and end[0] - start[0] >= 0.5:
            wall = end[0] - start[0]
            others = (end[1] - start[1]) - (end[2] - start[2])
            self.samples.append(max(0.0, others / self.hz / wall))

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        loads = self.loads or [float("nan")]
        return {"min": min(loads), "max": max(loads), "median": statistics.median(loads),
                "others_cores_median": statistics.median(s), "others_cores_max": max(s), "intervals": len(self.samples)}


def run_environment(module: str, argv: list[str], python: str = "python") -> dict:
    """The command line (as ``python -m module argv``), the date and the versions a report records."""
    from adainfer_lmeval.offline.pypi import package_versions

    return {
        "command": " ".join(shlex.quote(a) for a in [python, "-m", module, *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": package_versions(),
    }
