"""Where a run's wall time goes, phase by phase: what `bench/profile.md` is made of.

A stage times its own phases (`Phases`) and puts them in its `--json` result; the
time before the stage's code runs (interpreter start-up and the CLI's imports) is
measured from the process's start. Phases are kept per run, in the result, never in
module state.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


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

    On Linux from the start time in /proc (clock ticks since boot, 10 ms), against the
    boot-time clock: psutil's `create_time()` adds the boot time, which /proc gives in
    whole seconds, so it is off by up to a second.
    """
    import os

    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux
        import psutil

        return time.time() - psutil.Process().create_time()
