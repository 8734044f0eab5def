"""Stand-in Ray workers for tests/test_distributed.py, each an `ExtractionWorker` with one fault.

Ray's worker processes import this module by name, so the tests' Ray cluster is
started with tests/ on their PYTHONPATH (see the `ray_cluster` fixture).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pipeline.features.ray_engine import ExtractionWorker


def _covers(task, record: int, num_shards: int) -> bool:
    """Whether `task` (plain or views) reads this split shard's `record`."""
    if task.view is None:
        return task.start <= record < task.stop
    return any(int(p) // num_shards == record for p in task.positions)


class KillOnceWorker(ExtractionWorker):
    """Kills its own process (SIGKILL) after the first chunk it sends of a shard holding one of `kills`.

    `kills` are (record, view) pairs, view None for the plain features. Each kill
    happens once: a file in `markers` remembers it across the restarted processes.
    """

    def __init__(self, config, *, markers: str, kills, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.markers, self.kills = Path(markers), [tuple(k) for k in kills]

    def extract(self, task):
        armed = [
            self.markers / f"killed-{view}-{record}"
            for record, view in self.kills
            if task.view == view and _covers(task, record, self.config.num_shards)
        ]
        for batch in super().extract(task):
            yield batch
            for marker in armed:
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)


class PoisonWorker(ExtractionWorker):
    """Fails on the batch holding `record`, every time, like an image that crashes the decoder."""

    def __init__(self, config, *, record: int, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.record = record

    def _batches(self, task):
        for batch in super()._batches(task):
            records = batch[2] // self.config.num_shards
            if task.view is None and records[0] <= self.record <= records[-1]:
                raise RuntimeError(f"decoder crashed on record {self.record}")
            yield batch


class SlowWorker(ExtractionWorker):
    """Sleeps `delay` seconds before every batch, so a test can stop the driver mid-run."""

    def __init__(self, config, *, delay: float, **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.delay = delay

    def _batches(self, task):
        for batch in super()._batches(task):
            time.sleep(self.delay)
            yield batch
