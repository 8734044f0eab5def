"""The Ray driver's ceiling: stand-in workers return random features at full speed, so only the driver is measured.

Divided by one GPU worker's images per second, the driver's rows per second say how many
GPU workers one driver can feed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.phases import Phases

log = logging.getLogger(__name__)


class StandInWorker:
    """A Ray worker that returns random features at full speed: all that is left to measure is the driver.

    Same methods as `pipeline.features.ray_engine.ExtractionWorker`; plain features only.
    """

    def __init__(self, config, *, dim: int, chunk_bytes: int | None = None) -> None:
        from pipeline.features.ray_engine import CHUNK_BYTES

        self.batch_size = config.batch_size
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.features = np.random.default_rng(0).standard_normal((self.batch_size, dim), dtype=np.float32)

    def ready(self) -> dict[str, Any]:
        import os
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": []}

    def extract(self, task) -> Iterator[tuple]:
        from pipeline.features.ray_engine import coalesce

        yield from coalesce(self._batches(task), self.chunk_bytes)

    def _batches(self, task) -> Iterator[tuple]:
        for a in range(task.start, task.stop, self.batch_size):
            index = np.arange(a, min(task.stop, a + self.batch_size), dtype=np.int64)
            yield self.features[: len(index)], index % 2, index, [b"stand-in-%d" % i for i in index]


class _NullWriter:
    """Takes rows and drops them: the driver's receiving alone."""

    attrs = {"dataset_version": "stand-in"}

    def committed(self, split: str) -> tuple[int, int]:
        return 0, -1

    def append(self, *args) -> None:
        pass


def _row(what: str, workers: int, rows: int, seconds: float) -> dict[str, Any]:
    return {
        "what": what,
        "workers": workers,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
    }


def _writer(work_dir: Path, name: str, *, rows: int, dim: int):
    from pipeline.features.store import FeatureWriter

    attrs = {"key": {"stand-in": rows}, "dataset_version": "stand-in"}
    return FeatureWriter(
        work_dir / f"{name}.h5", attrs=attrs, splits={"train": {"spec": "stand-in"}}, feature_dim=dim, dtype="float32"
    )


def _write_only(*, rows: int, dim: int, batch_size: int, work_dir: Path) -> list[dict[str, Any]]:
    """The writer alone, appending a batch at a time (the local engine) and ~4 MB at a time (the Ray driver)."""
    from pipeline.features.ray_engine import WRITE_BYTES

    results = []
    for size, what in ((batch_size, f"{batch_size} rows"), (max(1, WRITE_BYTES // (4 * dim)), "4 MB")):
        batch = np.random.default_rng(0).standard_normal((size, dim), dtype=np.float32)
        with _writer(work_dir, f"write-only-{size}", rows=rows, dim=dim) as w:
            started = time.perf_counter()
            for a in range(0, rows, size):
                index = np.arange(a, min(rows, a + size))
                w.append("train", batch[: len(index)], index % 2, index, [b"x"] * len(index))
            seconds = time.perf_counter() - started
        results.append(_row(f"write only, appends of {what} (no Ray)", 0, rows, seconds))
    return results


def _split(rows: int, size: int):
    from pipeline.features.sources import SplitSource

    def unused(start: int):
        raise AssertionError("stand-in workers read no records")

    return SplitSource(name="train", spec="stand-in", size=size, total=rows, records=unused)


def _through_ray(
    count: int, *, rows: int, dim: int, batch_size: int, shard_size: int, warm_up: int, work_dir: Path
) -> list[dict[str, Any]]:
    """`count` stand-in workers: receiving only, then receiving and writing, then finishing the file."""
    from pipeline.config import DataConfig, EngineConfig, FeaturesConfig
    from pipeline.features.ray_engine import RayEngine

    config = FeaturesConfig(
        data=DataConfig(dataset="stand-in"), backbone="tiny", weights="none", batch_size=batch_size, image_size=32
    )
    engine = RayEngine(
        EngineConfig(name="ray", workers=count, shard_size=shard_size), worker=StandInWorker, worker_kwargs={"dim": dim}
    )
    workers = f"{count} stand-in worker{'s' if count > 1 else ''}"
    results = []
    with engine.start(config, None, Phases()) as runner:
        runner.extract_split(_split(rows, warm_up), _NullWriter(), progress=False)  # the first task imports more
        started = time.perf_counter()
        got = runner.extract_split(_split(rows, rows), _NullWriter(), progress=False)
        results.append(_row(f"receive only ({workers})", count, got, time.perf_counter() - started))
        with _writer(work_dir, f"ray-{count}", rows=rows, dim=dim) as writer:
            started = time.perf_counter()
            got = runner.extract_split(_split(rows, rows), writer, progress=False)
            results.append(_row(f"receive and write ({workers})", count, got, time.perf_counter() - started))
        started = time.perf_counter()  # the finished file: a gzip copy of the partial one, after the last shard
        writer.finish({})
        results.append(_row("finish the file (gzip copy, once per run)", count, got, time.perf_counter() - started))
    for row in results:
        log.info("bench-scale driver: %s", row)
    return results


def bench_driver(
    *, rows: int, dim: int, batch_size: int, work_dir: Path, workers: tuple[int, ...] = (1, 2), shard_size: int = 1000
) -> list[dict[str, Any]]:
    """Rows per second one driver receives from stand-in workers and writes, and writes alone.

    Measured in this process (the driver): for each number of workers, receiving
    only (rows dropped), and receiving and writing the feature file; and the writer
    alone, appending batches of `batch_size` rows with no Ray at all.
    """
    results = _write_only(rows=rows, dim=dim, batch_size=batch_size, work_dir=work_dir)
    sizes = {"rows": rows, "dim": dim, "batch_size": batch_size, "shard_size": shard_size}
    for count in workers:
        results += _through_ray(count, **sizes, warm_up=shard_size * max(workers), work_dir=work_dir)
    return results
