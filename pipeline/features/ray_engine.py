"""Stage 1 on a Ray cluster (ENGINE=ray): many small shards, many workers, one writer.

Every split is cut into contiguous shards of about `EngineConfig.shard_size`
images, far more shards than workers. A worker is a Ray actor that builds the
backbone once, in its own process (a model is never pickled), and reads its own
images: what goes over the wire is a `ShardTask` (split name and record range, or
for views the train positions), and what comes back is numpy features, batch by
batch, through Ray's object store. No shared filesystem is needed for the output:
the driver is the only process that writes, through the same `FeatureWriter` as the
local engine, in source order, so the file equals a one-process run's.

Order and memory: shards are dispatched in source order; a shard's batches are
written as soon as every shard before it is written, and finished shards that
arrive early wait in memory. Only shards within `window` of the oldest unwritten
one are dispatched, which bounds that memory (window x shard size x feature width).

Faults:
- A worker process that dies (killed, out of memory, lost node) is restarted by Ray
  (`max_restarts`); its shard goes back to the queue and is resumed, on whichever
  worker is free first, after the last batch the driver received, so the output is
  the same as without the fault.
- A driver that dies (Ctrl-C, kill -9) loses nothing committed: a rerun resumes
  after the last written row, so it recomputes at most the shards that were in
  flight or waiting in the window.
- A shard that fails `max_attempts` times stops the run with a `WorkerError` naming
  the shard and the first image it could not deliver. Errors that retrying cannot
  fix (`PipelineError`, e.g. an image folder that differs on a worker's host) stop
  it at once.

Ray is imported only here, and only when ENGINE=ray is asked for.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EngineConfig, FeaturesConfig, ViewsConfig
from pipeline.errors import ConfigError, DataError, PipelineError, WorkerError
from pipeline.features.batches import feature_batches, resume_position, view_feature_batches, views_left
from pipeline.features.sources import DataSource, SplitSource
from pipeline.features.store import FeatureWriter
from pipeline.phases import Phases

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pipeline[ray]'"


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            f"ENGINE=ray needs the ray package, which is not installed ({err}). Install it with "
            f"`{INSTALL_HINT}`, or use ENGINE=local."
        ) from None
    return ray


@dataclass(frozen=True)
class ShardTask:
    """One unit of work as it goes over the wire: where to read, never what was read.

    Plain features: records [start, stop) of this shard of split `split`. Views
    (`view` set): view `view` of the train images at split positions `positions`,
    augmented as `views` says. `expected` is what the driver's data source says about
    the split (dataset version, spec, size), checked by the worker against its own.
    """

    split: str
    start: int = 0
    stop: int = 0
    view: int | None = None
    positions: np.ndarray | None = None
    views: ViewsConfig | None = None
    expected: dict[str, Any] = field(default_factory=dict)
    #: The split restricted to the images the store lacks: a Ray object holding (positions, view
    #: keys) of `SplitSource.origin`, put once per split and shared by its tasks.
    origin: Any = None


# --- workers -------------------------------------------------------------------------

#: Features a worker gathers before sending them (see `ExtractionWorker`).
CHUNK_BYTES = 1 << 20
#: Features of the oldest unwritten shard the driver gathers before appending them to
#: the file: appends of ~1000 rows write about ten times faster than appends of 32.
WRITE_BYTES = 4 << 20


def coalesce(batches: Iterator[tuple], limit: int) -> Iterator[tuple]:
    """Joins consecutive batches until they hold `limit` bytes of features; the last one may hold less."""
    pending: list[tuple] = []
    size = 0
    for batch in batches:
        pending.append(batch)
        size += batch[0].nbytes
        if size >= limit:
            yield join_batches(pending)
            pending, size = [], 0
    if pending:
        yield join_batches(pending)


def join_batches(batches: list[tuple]) -> tuple:
    """One batch of many: arrays concatenated, lists (ids) chained."""
    if len(batches) == 1:
        return batches[0]
    return tuple(
        [item for b in batches for item in b[i]]
        if isinstance(batches[0][i], list)
        else np.concatenate([b[i] for b in batches])
        for i in range(len(batches[0]))
    )


def enable_memory_growth() -> None:
    """Lets TensorFlow take GPU memory as it needs it; must run before any TF op.

    Without it every actor reserves all the memory of the GPUs it can see.
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


class ExtractionWorker:
    """The state of one Ray actor: the backbone, built once here, and its own data source.

    `extract(task)` is a generator: consecutive batches go back to the driver as soon
    as they hold `chunk_bytes` of features (and at the end of the shard), which drives
    the progress bar and lets a retry resume after the last chunk received. Chunks of
    about a megabyte keep Ray's cost per object (about a millisecond of the driver's
    time) small next to the rows they carry.
    """

    def __init__(self, config: FeaturesConfig, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.config = config
        self._source: DataSource | None = None
        self._augmenters: dict[str, Any] = {}
        self._restricted: dict[str, SplitSource] = {}
        # A user error here is kept for ready() to raise: Ray reports a failed constructor
        # as a message only, while a method's exception reaches the driver as itself.
        self._error: PipelineError | None = None
        enable_memory_growth()
        from pipeline.features.backbones import get_backbone
        from pipeline.features.extractor import build_extractor
        from pipeline.features.runtimes import forward_for

        try:
            model = build_extractor(
                config.backbone,
                image_size=config.image_size,
                weights=config.weights_arg,
                pooling=config.pooling,
                mixed_precision=config.mixed_precision,
            )
            spec = get_backbone(config.backbone, config.weights_arg)
            self.forward = forward_for(model, config, spec, Phases())
            self.resize = spec.resize(config.image_size)
        except PipelineError as err:
            self._error = err
            return

    def ready(self) -> dict[str, Any]:
        """Where this worker runs; answering at all means the backbone is built."""
        import ray

        if self._error is not None:
            raise self._error
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "runtime": self.forward.record(),
        }

    def extract(self, task: ShardTask) -> Iterator[tuple]:
        yield from coalesce(self._batches(task), self.chunk_bytes)

    def _batches(self, task: ShardTask) -> Iterator[tuple]:
        split = self._split(task)
        config = self.config
        if task.view is None:
            yield from feature_batches(
                split,
                self.forward,
                start=task.start,
                stop=task.stop,
                resize=self.resize,
                batch_size=config.batch_size,
            )
        else:
            yield from view_feature_batches(
                split,
                self.forward,
                self._augmenter(task.views),
                view=task.view,
                positions=task.positions,
                num_shards=config.num_shards,
                resize=self.resize,
                batch_size=config.batch_size,
            )

    def _split(self, task: ShardTask) -> SplitSource:
        """The split as this worker reads it, refused if it differs from the driver's."""
        from pipeline.features.data import load_source

        config = self.config
        if self._source is None:
            self._source = load_source(
                config.data, seed=config.seed, shard_index=config.shard_index, num_shards=config.num_shards
            )
        split = self._source.splits.get(task.split)
        mine = {"version": self._source.version, "spec": split and split.spec, "total": split and split.total}
        if mine != task.expected:
            raise DataError(
                f"Worker on {socket.gethostname()} reads other data than the driver for split '{task.split}': "
                f"driver {task.expected}, worker {mine}. Every node needs the same data at the same path "
                "(DATA_DIR or TFDS_DIR)."
            )
        if task.origin is None:
            return split
        key = task.origin.hex()
        if key not in self._restricted:
            import ray

            self._restricted = {key: split.restricted(*ray.get(task.origin))}  # one split at a time
        return self._restricted[key]

    def _augmenter(self, views: ViewsConfig):
        from pipeline.augment import example_augmenter

        name = repr(views.identity())
        if name not in self._augmenters:
            self._augmenters[name] = example_augmenter(views.augment, seed=views.seed)
        return self._augmenters[name]


# --- the engine ------------------------------------------------------------------------


class RayEngine:
    """Runs stage 1 on the actors of a Ray cluster; see the module docstring.

    `worker` is the actor's class (`ExtractionWorker`; benchmarks and tests pass
    stand-ins with the same methods) and `worker_kwargs` extra arguments for it.
    """

    def __init__(
        self, config: EngineConfig, *, worker: type = ExtractionWorker, worker_kwargs: dict[str, Any] | None = None
    ) -> None:
        self.config = config
        self.worker = worker
        self.worker_kwargs = dict(worker_kwargs or {})
        #: Seconds from asking for a cluster to every worker having built its backbone (last run).
        self.startup_seconds: float | None = None
        #: Shard attempts that failed (worker deaths and errors) in the last run.
        self.failures = 0
        #: Workers of the last run, and where they ran.
        self.workers: list[dict[str, Any]] = []

    def describe(self) -> str:
        """One line about the last run: workers, hosts, start-up seconds and failed attempts."""
        if self.startup_seconds is None:
            return ""
        hosts = sorted({w["host"] for w in self.workers})
        return (
            f"engine: ray, {len(self.workers)} worker(s) on {', '.join(hosts)}, start-up "
            f"{self.startup_seconds:.1f} s, {self.failures} failed shard attempt(s)"
        )

    @contextlib.contextmanager
    def start(self, config: FeaturesConfig, spec, phases: Phases) -> Iterator[RayRunner]:
        """Connects to (or starts) a cluster, starts the workers, and tears down what it started.

        `phases` gets the start-up; the work itself runs on the workers, in parallel.
        """
        ray = import_ray()
        began = time.perf_counter()
        self.failures = 0
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.config.address, include_dashboard=False, logging_level=logging.WARNING)
        actors: list[Any] = []
        try:
            workers, gpus, cpus = self._placement(ray.cluster_resources())
            remote = ray.remote(self.worker).options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_restarts=self.config.max_attempts,
                max_task_retries=0,
            )
            actors = [remote.remote(config, **self.worker_kwargs) for _ in range(workers)]
            self.workers = _first_pipeline_error(ray, lambda: ray.get([a.ready.remote() for a in actors]))
            self.startup_seconds = time.perf_counter() - began
            phases.add("start Ray and its workers", self.startup_seconds)
            hosts = sorted({i["host"] for i in self.workers})
            log.info(
                "Ray: %d worker(s) with %g GPU and %g CPU each on %s, ready in %.1f s",
                workers,
                gpus,
                cpus,
                ", ".join(hosts),
                self.startup_seconds,
            )
            yield RayRunner(ray, actors, config, self)
        finally:
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            if started_here:
                ray.shutdown()

    def _placement(self, resources: dict[str, float]) -> tuple[int, float, float]:
        """(workers, GPUs per worker, CPUs per worker) for a cluster with `resources`."""
        have_gpus = float(resources.get("GPU", 0))
        have_cpus = float(resources.get("CPU", 0))
        gpus = self.config.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if have_gpus else 0.0
        workers = self.config.workers
        if workers is None:
            workers = max(1, int(have_gpus // gpus)) if gpus else 1
        if workers * gpus > have_gpus:
            raise ConfigError(
                f"WORKERS={workers} x GPUS_PER_WORKER={gpus:g} needs {workers * gpus:g} GPUs; the Ray cluster "
                f"has {have_gpus:g}. Lower WORKERS or GPUS_PER_WORKER (0 runs on CPUs), or add GPU nodes."
            )
        if workers > have_cpus:
            raise ConfigError(
                f"WORKERS={workers} needs a CPU each; the Ray cluster has {have_cpus:g}. Lower WORKERS or add nodes."
            )
        # Each worker's share of the CPUs (Ray sizes its thread pools by it); at least one.
        cpus = max(1.0, float(int(have_cpus // workers)))
        return workers, gpus, cpus


def _first_pipeline_error(ray, call: Callable[[], Any]) -> Any:
    """`call()`, re-raising a user error raised inside a worker as itself, not wrapped by Ray."""
    try:
        return call()
    except ray.exceptions.RayError as err:
        cause = _pipeline_cause(err)
        if cause is not None:
            raise cause from None
        raise


def _pipeline_cause(err: BaseException) -> PipelineError | None:
    """The `PipelineError` a Ray task error wraps, if any: the innermost, whose message is the user's.

    (Ray's wrapper may itself pass for the error's class, with its traceback for a message.)
    """
    found, seen = None, 0
    while err is not None and seen < 8:
        if isinstance(err, PipelineError):
            found = err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return found


@dataclass
class _Shard:
    """A shard as the driver tracks it: what is left to compute, and what waits to be written."""

    seq: int
    split: SplitSource
    start: int  # plain: next record to compute; views: next row of `rows` to compute
    stop: int
    rows: np.ndarray | None = None  # views: the split positions of the shard's train rows
    view: int | None = None
    attempts: int = 0
    done: bool = False
    batches: list[tuple] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __lt__(self, other: _Shard) -> bool:
        return self.seq < other.seq

    def describe(self) -> str:
        if self.view is None:
            return f"shard {self.seq} of split '{self.split.name}' (records {self.start}-{self.stop - 1})"
        first = int(self.rows[min(self.start, len(self.rows) - 1)])
        return f"shard {self.seq} of view {self.view} of '{self.split.name}' (positions {first}-{int(self.rows[-1])})"

    def first_record(self, num_shards: int) -> int:
        """This split shard's record number of the first image the shard has not delivered yet."""
        if self.view is None:
            return self.start
        return int(self.rows[min(self.start, len(self.rows) - 1)]) // num_shards


class RayRunner:
    """The driver's side of a Ray run: plans shards, dispatches them, writes in order."""

    def __init__(self, ray, actors: Sequence[Any], config: FeaturesConfig, engine: RayEngine) -> None:
        self.ray = ray
        self.actors = list(actors)
        self.config = config
        self.engine = engine
        #: Shards dispatched or waiting to be written, at most, counted from the oldest unwritten one.
        self.window = 2 * len(self.actors) + 2
        # Worker health, kept across splits: a worker whose process died is probed with
        # ready() until Ray has restarted it (idle again) or given it up (dead).
        self.dead: set[int] = set()
        self.probing: dict[Any, int] = {}  # ready() call -> worker number
        self.reprobe: list[tuple[float, int]] = []  # (not before, worker number)

    def runtimes(self) -> list[str]:
        """The runtimes the workers chose (each verifies its own first batch; see `pipeline.features.runtimes`)."""
        return list(dict.fromkeys(w["runtime"] for w in self.engine.workers if "runtime" in w))

    def extract_split(self, split: SplitSource, writer: FeatureWriter, *, progress: bool) -> int:
        start = resume_position(writer, split.name, self.config.num_shards)
        if start >= split.size:
            return 0
        size = self.engine.config.shard_size
        shards = [
            _Shard(seq, split, a, min(a + size, split.size)) for seq, a in enumerate(range(start, split.size, size))
        ]
        expected = _expected(writer, split)
        origin = _origin(self.ray, split)
        num_shards = self.config.num_shards

        def task(shard: _Shard) -> ShardTask:
            return ShardTask(split=split.name, start=shard.start, stop=shard.stop, expected=expected, origin=origin)

        def received(shard: _Shard, batch: tuple) -> int:
            position = int(batch[2][-1]) // num_shards + 1
            advanced, shard.start = position - shard.start, position
            return advanced

        def write(batches: list[tuple]) -> None:
            writer.append(split.name, *join_batches(batches))

        return self._run(
            shards, task, received, write, desc=split.name, total=split.size, initial=start, progress=progress
        )

    def extract_views(
        self, split: SplitSource, writer: FeatureWriter, views: ViewsConfig, *, progress: bool
    ) -> tuple[int, float]:
        source_index, total, done = views_left(writer, split.name, views.num_views)
        n = len(source_index)
        if n == 0 or done >= total:
            return 0, 0.0
        size = self.engine.config.shard_size
        shards = []
        for view in range(done // n, views.num_views):
            first = done - view * n if view == done // n else 0
            for a in range(first, n, size):
                shards.append(
                    _Shard(
                        len(shards), split, 0, min(a + size, n) - a, rows=source_index[a : min(a + size, n)], view=view
                    )
                )
        expected = _expected(writer, split)
        origin = _origin(self.ray, split)

        def task(shard: _Shard) -> ShardTask:
            return ShardTask(
                split=split.name,
                view=shard.view,
                positions=shard.rows[shard.start :],
                views=views,
                expected=expected,
                origin=origin,
            )

        def received(shard: _Shard, batch: tuple) -> int:
            shard.start += len(batch[2])
            return len(batch[2])

        seconds = 0.0
        tick = time.perf_counter()

        def write(batches: list[tuple]) -> None:
            # Charged the time since the previous write, as the local engine does: the sum is the wall time.
            nonlocal seconds, tick
            now = time.perf_counter()
            writer.append_views(*join_batches(batches), now - tick)
            seconds += now - tick
            tick = now

        rows = self._run(
            shards, task, received, write, desc=f"{split.name} views", total=total, initial=done, progress=progress
        )
        log.info("views: %d rows of %d views in %.1f s", rows, views.num_views, seconds)
        return rows, seconds

    def _run(
        self,
        shards: list[_Shard],
        task: Callable[[_Shard], ShardTask],
        received: Callable[[_Shard, tuple], int],
        write: Callable[[list[tuple]], None],
        *,
        desc: str,
        total: int,
        initial: int,
        progress: bool,
    ) -> int:
        """Runs `shards` on the workers and writes their batches in shard order; returns rows computed.

        `task(shard)` is what is left of a shard, `received(shard, batch)` records a
        batch and returns how far it moved the progress bar, `write(batches)` appends
        consecutive batches to the file.
        """
        from tqdm.auto import tqdm

        ray = self.ray
        queue = list(shards)
        heapq.heapify(queue)
        head = 0  # the oldest shard not yet written completely
        running: dict[Any, tuple[int, _Shard]] = {}  # generator -> (worker number, shard)
        unwell = set(self.probing.values()) | {a for _, a in self.reprobe}
        idle = [i for i in range(len(self.actors)) if i not in self.dead and i not in unwell]
        rows = 0
        with tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        ) as bar:
            while head < len(shards):
                self._probe_again()
                while idle and queue and queue[0].seq < shards[head].seq + self.window:
                    shard, actor = heapq.heappop(queue), idle.pop(0)
                    running[self.actors[actor].extract.remote(task(shard))] = (actor, shard)
                if not running and not self.probing and not self.reprobe:
                    raise WorkerError(
                        f"Every Ray worker has died ({len(self.dead)} of {len(self.actors)}); "
                        f"{shards[head].describe()} is unfinished. Finished shards are saved: check the "
                        "workers' logs (out of memory?) and rerun to resume."
                    )
                ready, _ = ray.wait([*running, *self.probing], num_returns=1, timeout=0.5)
                rows += self._receive(ready, running, queue, idle, received, bar)
                head = _write_finished(shards, head, write, bar)
                alive = len(self.actors) - len(self.dead) - len(self.probing) - len(self.reprobe)
                bar.set_postfix(workers=f"{alive}/{len(self.actors)}", refresh=False)
        return rows

    def _receive(self, ready, running: dict, queue: list[_Shard], idle: list[int], received, bar) -> int:
        """Takes one batch (or the end, or a failure) from each ready generator; returns the rows received."""
        ray = self.ray
        rows = 0
        for ref in ready:
            if ref in self.probing:
                self._probed(ref, self.probing.pop(ref), idle)
                continue
            actor, shard = running[ref]
            try:
                batch = ray.get(next(ref))
            except StopIteration:
                del running[ref]
                shard.done = True
                idle.append(actor)
            except ray.exceptions.RayError as err:
                del running[ref]
                self._failed(shard, actor, err, queue, idle)
            else:
                shard.batches.append(batch)
                rows += len(batch[2])
                bar.update(received(shard, batch))
        return rows

    def _failed(self, shard: _Shard, actor: int, err: BaseException, queue: list[_Shard], idle: list[int]) -> None:
        """A shard attempt failed: stop on a user error, else queue the rest of the shard again."""
        cause = _pipeline_cause(err)
        if cause is not None:
            raise cause from None
        self.engine.failures += 1
        shard.attempts += 1
        shard.errors.append(_one_line(err))
        log.warning(
            "%s failed on worker %d (attempt %d of %d): %s",
            shard.describe(),
            actor,
            shard.attempts,
            self.engine.config.max_attempts,
            shard.errors[-1],
        )
        if shard.attempts >= self.engine.config.max_attempts:
            record = shard.first_record(self.config.num_shards)
            raise WorkerError(
                f"{shard.describe()} failed {shard.attempts} times; the first image it could not deliver is "
                f"{_record_id(shard.split, record)} (split position "
                f"{record * self.config.num_shards + self.config.shard_index}). Last error: {shard.errors[-1]}. "
                "Finished shards are saved: fix or remove that image (or the worker's problem) and rerun to resume."
            )
        heapq.heappush(queue, shard)
        if isinstance(err, self.ray.exceptions.RayTaskError):
            idle.append(actor)  # the worker itself is fine; others get the retry first
        else:
            self.probing[self.actors[actor].ready.remote()] = actor  # restarting, or gone for good

    def _probed(self, ref: Any, actor: int, idle: list[int]) -> None:
        """Back to work once restarted; probed again while restarting; never again once gone."""
        try:
            self.ray.get(ref)
        except self.ray.exceptions.ActorUnavailableError:
            self.reprobe.append((time.monotonic() + 0.5, actor))
        except self.ray.exceptions.RayError as err:
            self.dead.add(actor)
            log.warning("Ray worker %d is gone for good: %s", actor, _one_line(err))
        else:
            idle.append(actor)

    def _probe_again(self) -> None:
        now = time.monotonic()
        due = [a for when, a in self.reprobe if when <= now]
        self.reprobe = [(when, a) for when, a in self.reprobe if when > now]
        for actor in due:
            self.probing[self.actors[actor].ready.remote()] = actor


def _expected(writer: FeatureWriter, split: SplitSource) -> dict[str, Any]:
    """What a worker's view of `split` must match: the data this file describes."""
    total = split.origin[2] if split.origin is not None else split.total
    return {"version": writer.attrs["dataset_version"], "spec": split.spec, "total": total}


def _origin(ray, split: SplitSource) -> Any:
    """What a worker needs to restrict its split as the driver did (only the missing rows travel), put once."""
    return None if split.origin is None else ray.put(split.origin[:2])


def _record_id(split: SplitSource, record: int) -> str:
    """The id of the `record`-th record of `split`, read from the source (no decoding)."""
    for r in split.records(record).take(1):
        return r["id"].numpy().decode()
    return f"record {record}"


def _one_line(err: BaseException) -> str:
    """'RuntimeError: what went wrong': the worker's own exception rather than Ray's wrapper."""
    err = getattr(err, "cause", None) or err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _write_finished(shards: list[_Shard], head: int, write, bar) -> int:
    """Writes the batches that are next in shard order; returns the oldest shard not yet written completely.

    A shard still running is written once it holds `WRITE_BYTES`, so memory stays flat.
    """
    while head < len(shards) and (shards[head].batches or shards[head].done):
        shard = shards[head]
        if not shard.done and sum(b[0].nbytes for b in shard.batches) < WRITE_BYTES:
            break
        if shard.batches:
            write(shard.batches)
            shard.batches = []
        if not shard.done:
            break
        bar.update(shard.stop - shard.start)  # records skipped at the end of the shard
        shard.start = shard.stop
        head += 1
    return head
