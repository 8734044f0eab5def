"""Where a run's wall time goes, phase by phase: what `bench/profile.md` is made of.

A stage times its own phases (`Phases`) and puts them in its `--json` result; the
time before the stage's code runs (interpreter start-up and the CLI's imports) is
measured from the process's start. Phases are kept per run, in the result, never in
module state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """Seconds per named phase, summed over repeated entries (a loop's decode, forward and write)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def record(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.seconds.items()}


def since_process_start() -> float:
    """Seconds since this process started: interpreter start-up and imports, when asked first thing.

    On Linux from the kernel's start tick (10 ms steps); psutil's `create_time` is the
    portable way, but it adds the boot time rounded to a whole second.
    """
    import os

    if hasattr(time, "CLOCK_BOOTTIME") and os.path.exists("/proc/self/stat"):
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        start_ticks = int(fields[19])  # field 22, starttime, counted after the name and state
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    import psutil

    return time.time() - psutil.Process().create_time()
