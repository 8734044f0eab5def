"""Stage 1: run a frozen backbone once over a dataset and cache its features.

The input pipeline decodes and resizes in parallel (tf.data) while a compiled
forward pass (`tf.function`, not `model.predict` per batch) runs the backbone in
inference mode. Each finished batch is appended to the store and made durable, so
an interrupted run resumes after its last finished batch.

Images that cannot be decoded are dropped by `ignore_errors` inside the pipeline;
nothing is lost silently, because every record carries its position in the split:
the positions missing from the file are exactly the skipped images, and they are
decoded once more, alone, to report why.

With `views` (AUG_VIEWS=K), the train images then go through the backbone K more
times, each time augmented by the layers of `pipeline.augment` (shared with stage
3). That buys most of data augmentation's benefit for the heads while the backbone
still runs a fixed number of times, not once per epoch. A view depends only on
(seed, view number, example position), so views resume after an interruption like
the plain features, and adding views to a finished file reuses its plain features.
Validation and test are never augmented.

Engines (`ENGINES`, chosen by ENGINE) decide where the backbone runs: `local`, in
this process, or `ray`, on the actors of a Ray cluster (`pipeline.distributed`).
Both run the same per-range work (`feature_batches`, `view_feature_batches`) and
write through the same `FeatureWriter` in source order, so the file does not say
which engine made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol

from pipeline import __version__, backbones
from pipeline.config import MAX_VIEW_POSITION, EngineConfig, FeaturesConfig, ViewsConfig, feature_file_name
from pipeline.data import DataSource, SplitSource, data_fingerprint, load_source
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.images import DECODER, decode_and_resize, tf_error_message
from pipeline.locks import exclusive
from pipeline.phases import Phases
from pipeline.store import (
    FORMAT_VERSION,
    VIEWS_SPLIT,
    FeatureWriter,
    key_diff,
    read_attrs,
    read_view_attrs,
    views_identity,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionResult:
    """What a `features` run did; `up_to_date` means it found the file finished.

    `images` and `seconds` count the plain features computed by this run; `view_images`
    and `view_seconds` the augmented views it computed. `view_attrs` are the finished
    file's /train/views attributes (the cost per view over all the runs that made them).
    """

    path: Path
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    skipped_items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    view_images: int = 0
    view_seconds: float = 0.0
    view_attrs: dict[str, Any] | None = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def num_views(self) -> int:
        return int(self.view_attrs["num_views"]) if self.view_attrs else 0

    def views_summary(self) -> str:
        """'2 augmented views per train image, 31.2 s and 9.8 MB per view', or '' without views.

        The cost per view is the file's: all the runs that computed its views.
        """
        if not self.num_views:
            return ""
        a = self.view_attrs
        return (
            f"{self.num_views} augmented views per train image, {a['seconds_per_view']:.1f} s and "
            f"{_size(a['bytes_per_view'])} per view"
        )

    def summary(self) -> str:
        if self.up_to_date:
            views = f" ({self.views_summary()})" if self.num_views else ""
            return f"features: up to date, nothing to do: {self.path}{views}"
        if self.images == 0 and self.view_images:
            text = "features: plain features kept"
        else:
            text = (
                f"features: {self.images} images, {self.skipped} skipped, {self.seconds:.1f} s, "
                f"{self.images_per_second:.1f} img/s"
            )
        if self.num_views:
            text += f"; views: {self.view_images} images in {self.view_seconds:.1f} s; {self.views_summary()}"
        return f"{text} -> {self.path}"

    def record(self) -> dict[str, Any]:
        """The result as JSON (`--json`): what `make bench` reads instead of the summary line."""
        return {"stage": "features", "path": str(self.path), "up_to_date": self.up_to_date,
                "images": self.images, "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2), "view_images": self.view_images,
                "view_seconds": round(self.view_seconds, 3), "num_views": self.num_views, "phases": self.phases}


def _size(n_bytes: float) -> str:
    """1536 -> '1.5 kB'."""
    if n_bytes < 1000:
        return f"{n_bytes:.0f} B"
    for unit in ("kB", "MB"):
        n_bytes /= 1000
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1000:.1f} GB"


def resolve(config: FeaturesConfig) -> tuple[FeaturesConfig, dict[str, Any], Path]:
    """Resolves the image size and computes the cache key and file path, without TensorFlow work."""
    spec = backbones.get_backbone(config.backbone)
    config = config.resolved(spec.default_size)
    key = config.key(
        data_fingerprint=data_fingerprint(config.data, seed=config.seed),
        weights_identity=backbones.weights_identity(config.weights_arg),
    )
    key["decoder"] = DECODER  # features of EXIF-rotated photos changed with the decoder
    return config, key, Path(config.output_dir) / feature_file_name(config, key)


def extract_features(
    config: FeaturesConfig, *, views: ViewsConfig | None = None, progress: bool = True,
    engine: Engine | None = None,
) -> ExtractionResult:
    """Runs stage 1 for `config`; a finished file with the same key is left as it is.

    `views` also caches `views.num_views` augmented views of every train image. A
    finished file that lacks them (or has fewer) is extended: its rows are copied, not
    recomputed. A file with at least as many views of the same augmentation and seed
    is up to date; views of another augmentation or seed are an error, never mixed.
    `engine` (from `get_engine`) says where the backbone runs, by default in this
    process; it never changes the file.

    One run writes a file at a time: the lock on it (`pipeline.locks.exclusive`) is
    held from the "is it up to date?" check to the rename, so a second run with the
    same settings waits, then finds the file finished or resumes its partial file.
    """
    phases = Phases()
    with phases("resolve key"):
        config, key, path = resolve(config)
    with exclusive(path, what="feature file"):
        result = _extract(config, key, path, views=views, progress=progress, engine=engine, phases=phases)
    return dataclasses.replace(result, phases=phases.record())


def _extract(config: FeaturesConfig, key: dict[str, Any], path: Path, *, views: ViewsConfig | None,
             progress: bool, engine: Engine | None, phases: Phases) -> ExtractionResult:
    """`extract_features` for a resolved config, under the lock on `path`."""
    views = views if views is not None and views.num_views else None
    extend = None
    if path.exists():
        attrs = read_attrs(path)
        if not (attrs.get("complete") and attrs.get("key") == key):
            raise CacheError(
                f"{path} exists but was built with other settings or is unfinished; it is "
                "never mixed with this run. Delete it to rebuild."
            )
        stored = read_view_attrs(path)
        if not _needs_views(path, stored, views):
            return ExtractionResult(path=path, up_to_date=True, view_attrs=stored)
        extend = path
    # The backbone first: missing weights fail in a second, before a dataset download.
    spec = backbones.get_backbone(config.backbone)
    with (engine or LocalEngine(EngineConfig())).start(config, spec, phases) as runner:
        with phases("list data"):
            source = load_source(
                config.data, seed=config.seed, shard_index=config.shard_index, num_shards=config.num_shards
            )
        if views is not None:
            _check_views_source(source, views)
        attrs = _file_attrs(config, key, source, spec)
        splits = {
            name: {"spec": split.spec, "num_inputs": split.size, "num_inputs_all_shards": split.total}
            for name, split in source.splits.items()
        }
        view_attrs = None if views is None else {
            "num_views": views.num_views, "seed": views.seed, "augment": views.augment.to_dict(),
            "config": views.to_dict(),
        }
        started = time.perf_counter()
        images = 0
        view_images, view_seconds = 0, 0.0
        skipped: dict[str, list[dict[str, Any]]] = {}
        with FeatureWriter(
            path, attrs=attrs, splits=splits, feature_dim=spec.feature_dim, dtype=config.dtype,
            views=view_attrs, extend=extend,
        ) as writer:
            for split in source.splits.values():
                images += runner.extract_split(split, writer, progress=progress)
                with phases("account for skipped images"):
                    skipped[split.name] = _skipped(split, writer, config)
                if skipped[split.name]:
                    for item in skipped[split.name]:
                        log.warning("skipped %s (split %s): %s", item["id"], split.name, item["reason"])  # the id as found on disk
                    if config.strict:
                        raise DataError(
                            f"{len(skipped[split.name])} image(s) of split '{split.name}' could not be "
                            f"read (first: {skipped[split.name][0]['id']}: {skipped[split.name][0]['reason']}) "
                            "and --strict is set. Fix or remove them, or drop --strict to skip them."
                        )
            seconds = time.perf_counter() - started
            if views is not None:
                view_images, view_seconds = runner.extract_views(
                    source.splits[VIEWS_SPLIT], writer, views, progress=progress
                )
    with phases("finish file"):
        writer.finish(skipped)
    total_skipped = sum(len(v) for v in skipped.values())
    return ExtractionResult(
        path=path, images=images, skipped=total_skipped, seconds=seconds, skipped_items=skipped,
        view_images=view_images, view_seconds=view_seconds, view_attrs=read_view_attrs(path),
    )


# --- engines -----------------------------------------------------------------------


class Runner(Protocol):
    """An engine started for one run: it fills the writer's splits and views in source order."""

    def extract_split(self, split: SplitSource, writer: FeatureWriter, *, progress: bool) -> int:
        """Appends the features of `split` after its committed rows; returns the rows computed."""

    def extract_views(
        self, split: SplitSource, writer: FeatureWriter, views: ViewsConfig, *, progress: bool
    ) -> tuple[int, float]:
        """Appends the missing views of the train rows; returns (rows computed, seconds)."""


class Engine(Protocol):
    def start(self, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> ContextManager[Runner]:
        """Builds what the run needs (the backbone, or a cluster and its workers) and tears it down after;
        `phases` gets the time of each step, and the runner's work."""

    def describe(self) -> str:
        """One line about the last run for the user ('' when there is nothing to say)."""


class LocalEngine:
    """Stage 1 in this process: one backbone and one tf.data pipeline, nothing to start."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def describe(self) -> str:
        return ""

    @contextlib.contextmanager
    def start(self, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases) -> Iterator[LocalRunner]:
        with phases("import TensorFlow and Keras"):
            from pipeline.extractor import build_extractor
        with phases("build model"):
            model = build_extractor(
                spec,
                image_size=config.image_size,
                weights=config.weights_arg,
                pooling=config.pooling,
                mixed_precision=config.mixed_precision,
            )
        with phases("trace forward pass"):
            forward = compiled_forward(model, config.image_size, config.batch_size)
        yield LocalRunner(forward, config, phases)


def _ray_engine(config: EngineConfig) -> Engine:
    from pipeline.distributed import RayEngine  # imports ray only when asked for

    return RayEngine(config)


#: Engine name (ENGINE) -> factory taking the `EngineConfig`.
ENGINES: dict[str, Callable[[EngineConfig], Engine]] = {"local": LocalEngine, "ray": _ray_engine}


def get_engine(config: EngineConfig) -> Engine:
    if config.name not in ENGINES:
        raise ConfigError(f"Unknown engine {config.name!r}. Expected one of: {', '.join(sorted(ENGINES))}.")
    return ENGINES[config.name](config)


def _needs_views(path: Path, stored: dict[str, Any] | None, views: ViewsConfig | None) -> bool:
    """Whether the finished file at `path` must get (more) views; refuses other views."""
    if views is None:
        return False
    if stored is None:
        return True
    asked, have = views.identity(), views_identity(stored)
    if have != asked:
        raise CacheError(
            f"{path} holds {stored['num_views']} augmented views made with other settings "
            f"({key_diff(have, asked)}); views are never mixed. Rerun with the file's AUG_* "
            "settings and SEED, or delete the file to rebuild it."
        )
    return int(stored["num_views"]) < views.num_views


def _check_views_source(source: DataSource, views: ViewsConfig) -> None:
    split = source.splits.get(VIEWS_SPLIT)
    if split is None:
        raise ConfigError(
            f"Augmented views are made of the '{VIEWS_SPLIT}' split, which this dataset lacks. "
            f"Received: splits {', '.join(source.splits)} and AUG_VIEWS={views.num_views}."
        )
    if split.total > MAX_VIEW_POSITION:
        raise ConfigError(
            f"Augmented views support train splits of up to {MAX_VIEW_POSITION} images. "
            f"Received: {split.total}. Use shards of a smaller split, or AUG_VIEWS=0."
        )


def _file_attrs(config: FeaturesConfig, key, source: DataSource, spec) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "config": config.to_dict(),
        "class_names": list(source.class_names),
        "class_counts": source.class_counts,
        "backbone": config.backbone,
        "backbone_family": spec.family,
        "weights": config.weights,
        "weights_identity": key["weights"],
        "image_size": config.image_size,
        "pooling": config.pooling,
        "preprocessing": spec.preprocessing,
        "resize": "bilinear, aspect ratio not kept",
        "dataset": source.name,
        "dataset_version": source.version,
        "source": key["source"],
        "splits": {name: split.spec for name, split in source.splits.items()},
        "seed": config.seed,
        "feature_dim": spec.feature_dim,
        "dtype": config.dtype,
        "shard_index": config.shard_index,
        "num_shards": config.num_shards,
        "package_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def image_batches(split: SplitSource, *, start: int, image_size: int, batch_size: int, schedule: InputSchedule,
                  stop: int | None = None):
    """Batches of (images, labels, ids, index) of the records [start, stop) of the split.

    `stop=None` reads to the end. Undecodable images are dropped here
    (`ignore_errors`) and accounted for by position afterwards; see the module docstring.
    `schedule` says when decoding runs relative to the forward pass (`input_schedule`).
    """
    return schedule.batches(
        _records(split, start, stop),
        lambda r: (decode_and_resize(r["image"], image_size), r["label"], r["id"], r["index"]),
        batch_size,
    )


def view_batches(split: SplitSource, *, keep, image_size: int, batch_size: int, augment, view: int,
                 schedule: InputSchedule):
    """Batches of (images, labels, ids, index) of augmented view `view` of the records at positions `keep`.

    Only the positions in `keep` (train rows of the plain features) are read, so images
    skipped there are not tried again. `augment` is
    `pipeline.augment.example_augmenter(...)`: it runs per image, in parallel, after
    decoding, and its result depends only on (seed, view, position).
    """
    return schedule.batches(
        split.at(keep).records(0),
        lambda r: (augment(decode_and_resize(r["image"], image_size), view, r["index"]), r["label"], r["id"], r["index"]),
        batch_size,
    )


@dataclass(frozen=True)
class InputSchedule:
    """When images are decoded relative to the forward pass: the one choice that decides
    whether extraction runs at the backbone's speed.

    `overlap` decodes in the background while the backbone runs (tf.data's AUTOTUNE map
    and prefetch): right when the backbone runs on an accelerator and the CPU is free.
    Without one, the backbone's kernels split every layer across all cores and wait for
    the slowest at each layer; a decoding thread that takes a core from one of them
    stalls the rest. `bursts` then decodes each batch on all cores between forward
    passes (a fixed parallel map, no prefetch), which costs decoding's CPU time divided
    by the cores and nothing more. Measured on 2 cores, MobileNetV2 (bench/profile.md):
    overlap ran at 0.56-0.97 of the bare forward pass from one run to the next, bursts
    at 0.89-1.06. Decoding ahead on threads lowered to SCHED_IDLE, which run only in
    the backbone's gaps, gained 2-5 points on an idle machine but ran 10x slower than
    bursts beside two busy processes (8 against 78 img/s), so it is not offered. Raising
    those threads while the backbone waits for them does not save it: Linux's fair
    scheduler queues them behind the busy processes (0.86 against 1.03 of the forward
    pass), and raising a thread's priority needs CAP_SYS_NICE.
    """

    name: str
    overlap: bool

    def batches(self, records, fn, batch_size: int):
        """`records` mapped by `fn`, unreadable images dropped, batched on this schedule."""
        import tensorflow as tf

        # `fn` holds no Python control flow: tracing it as written skips autograph's
        # conversion of it and its callees, a tenth of a second at a run's first pipeline.
        fn = tf.autograph.experimental.do_not_convert(fn)
        if self.overlap:
            ds = records.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.autotune.enabled = False  # autotuning would grow buffers and decode ahead again
        ds = records.map(fn, num_parallel_calls=_cores(), deterministic=True)
        return ds.ignore_errors().batch(batch_size).with_options(options)


OVERLAP = InputSchedule("overlap", overlap=True)
BURSTS = InputSchedule("bursts", overlap=False)


def input_schedule() -> InputSchedule:
    """`OVERLAP` when TensorFlow places the backbone on a GPU, `BURSTS` on a CPU."""
    import tensorflow as tf

    return OVERLAP if tf.config.list_logical_devices("GPU") else BURSTS


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and Ray set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _records(split: SplitSource, start: int, stop: int | None):
    records = split.records(start)
    return records if stop is None else records.take(max(0, stop - start))


@dataclass(frozen=True)
class Forward:
    """The backbone as one traced graph, and the input schedule for the device it runs on.

    Called like a function (images -> features); `schedule` is what `image_batches` and
    `view_batches` need to feed it (see `InputSchedule`).
    """

    fn: Any
    schedule: InputSchedule

    def __call__(self, images):
        return self.fn(images)


def compiled_forward(model, image_size: int, batch_size: int) -> Forward:
    """The backbone as one traced graph for every batch size, warmed up at `batch_size`.

    The batch dimension is left open so a split's last, smaller batch reuses the
    graph instead of tracing another. The warm-up call pays for the trace and for
    the kernels oneDNN builds for each input shape (a tenth of a second and more
    for MobileNetV2 on a CPU) before the first batch, as the benchmark's bare forward
    pass does before its timing starts.
    """
    import tensorflow as tf

    # No Python control flow: traced as written, without autograph (0.02-0.03 s).
    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)], autograph=False)
    def forward(images):
        return model(images, training=False)

    forward(tf.zeros((batch_size, image_size, image_size, 3))).numpy()
    schedule = input_schedule()
    log.info("input schedule: %s", schedule.name)
    return Forward(forward, schedule)


def feature_batches(
    split: SplitSource, forward: Forward, *, start: int, stop: int | None = None, image_size: int, batch_size: int,
    phases: Phases | None = None,
) -> Iterator[tuple]:
    """The features of the records [start, stop) of `split`, batch by batch, as numpy.

    Yields (features (B, D) float32, labels (B,) int64, index (B,) int64, ids: list of
    bytes); undecodable images are left out, so their positions are missing from
    `index`. Positions count the records of this shard of the split (see
    `SplitSource`). This is the one piece of stage-1 work every engine runs: the local
    engine over a whole split, a Ray worker over one of its shards.
    """
    phases = phases or Phases()
    with phases("build input pipeline"):
        batches = iter(image_batches(
            split, start=start, stop=stop, image_size=image_size, batch_size=batch_size, schedule=forward.schedule,
        ))
    while True:
        with phases("decode"):  # with the overlap schedule: the wait for decoded images
            batch = next(batches, None)
        if batch is None:
            return
        images, labels, ids, index = batch
        with phases("forward"):
            features = forward(images).numpy()
        yield features, labels.numpy(), index.numpy(), ids.numpy().tolist()


def view_feature_batches(
    split: SplitSource, forward: Forward, augment, *, view: int, positions, num_shards: int, image_size: int,
    batch_size: int,
) -> Iterator[tuple]:
    """The features of augmented view `view` of the train images at `positions`, batch by batch.

    `positions` are sorted split positions (the `index` of train rows). Yields
    (features, labels, index, view) as numpy, one row per position in order; an image
    that was read for the plain features but fails now raises a `DataError`, since a
    view row can never be left out. Both engines run it (see `feature_batches`).
    """
    import numpy as np

    positions = np.asarray(positions, np.int64)
    if not len(positions):
        return
    row = 0
    for images, labels, _, index in view_batches(
        split, keep=positions, image_size=image_size, batch_size=batch_size, augment=augment, view=view,
        schedule=forward.schedule,
    ):
        index = index.numpy()
        # Only train rows are read (`keep`), so a difference is a row that failed now.
        expected = positions[row : row + len(index)]
        if not np.array_equal(expected, index):
            raise _lost_view_image(split, view, int(expected[np.argmax(expected != index)]))
        yield forward(images).numpy(), labels.numpy(), index, np.full(len(index), view, np.int64)
        row += len(index)
    if row != len(positions):
        raise _lost_view_image(split, view, int(positions[row]))


class LocalRunner:
    """The local engine's work: whole splits through one forward pass, committed batch by batch."""

    def __init__(self, forward: Forward, config: FeaturesConfig, phases: Phases) -> None:
        self.forward = forward
        self.config = config
        self.phases = phases

    def extract_split(self, split: SplitSource, writer: FeatureWriter, *, progress: bool) -> int:
        from tqdm.auto import tqdm

        config = self.config
        start = resume_position(writer, split.name, config.num_shards)
        if start >= split.size:
            return 0
        done = start
        written = 0
        with tqdm(
            total=split.size, initial=start, desc=split.name, unit="img", disable=not progress,
            dynamic_ncols=True, mininterval=0.5,
        ) as bar:
            for features, labels, index, ids in feature_batches(
                split, self.forward, start=start, image_size=config.image_size, batch_size=config.batch_size,
                phases=self.phases,
            ):
                with self.phases("write"):
                    writer.append(split.name, features, labels, index, ids)
                written += len(index)
                position = int(index[-1]) // config.num_shards + 1
                bar.update(position - done)
                done = position
            bar.update(split.size - done)
        return written

    def extract_views(
        self, split: SplitSource, writer: FeatureWriter, views: ViewsConfig, *, progress: bool
    ) -> tuple[int, float]:
        """Appends the missing views of the train rows, view by view; returns (rows, seconds).

        The views table is view-major (row v*N + r is view v of train row r), so the
        committed row count says which view and which train row to resume at.
        """
        from tqdm.auto import tqdm

        from pipeline.augment import example_augmenter

        config = self.config
        source_index, total, done = views_left(writer, split.name, views.num_views)
        n = len(source_index)
        if n == 0 or done >= total:
            return 0, 0.0
        augment = example_augmenter(views.augment, seed=views.seed)
        written, seconds = 0, 0.0
        # Each batch is charged the time since the previous one was saved, so building each
        # view's pipeline counts too: the sum is the wall time of the views.
        tick = time.perf_counter()
        with tqdm(
            total=total, initial=done, desc=f"{split.name} views", unit="img", disable=not progress,
            dynamic_ncols=True, mininterval=0.5,
        ) as bar:
            while done < total:
                view, row = divmod(done, n)
                for features, labels, index, view_column in view_feature_batches(
                    split, self.forward, augment, view=view, positions=source_index[row:],
                    num_shards=config.num_shards, image_size=config.image_size, batch_size=config.batch_size,
                ):
                    now = time.perf_counter()
                    writer.append_views(features, labels, index, view_column, now - tick)
                    seconds += now - tick
                    tick = now
                    written += len(index)
                    done += len(index)
                    bar.update(len(index))
        log.info("views: %d rows of %d views in %.1f s", written, views.num_views, seconds)
        return written, seconds


def views_left(writer: FeatureWriter, split: str, num_views: int):
    """(source index of the train rows, view rows in all, view rows written): where views resume.

    The views table is view-major (row v*N + r is view v of train row r), so the
    committed row count says which view and which train row come next.
    """
    source_index = writer.written_index(split)
    return source_index, num_views * len(source_index), writer.views_committed()


def resume_position(writer: FeatureWriter, split: str, num_shards: int) -> int:
    """The record of this shard of `split` after the last committed row (0 for a new file)."""
    rows, last = writer.committed(split)
    return last // num_shards + 1 if rows else 0


def _lost_view_image(split: SplitSource, view: int, position: int) -> DataError:
    """A train image that decoded for the plain features but not for a view: never left out silently."""
    return DataError(
        f"The {split.name} image at position {position} was read for the plain features but not for "
        f"augmented view {view} (did the image folder change?). Rerun to resume; the views finished "
        "so far are kept."
    )


def _skipped(split: SplitSource, writer: FeatureWriter, config: FeaturesConfig) -> list[dict[str, Any]]:
    """The records of `split` missing from the file, each with the decoder's reason."""
    import tensorflow as tf

    written = set(writer.written_index(split.name).tolist())
    expected = range(config.shard_index, split.total, config.num_shards)
    missing = [p for p in expected if p not in written]
    if not missing:
        return []
    items = []
    for record in split.at(missing).records(0):
        try:
            decode_and_resize(record["image"], config.image_size)
            reason = "could not be read"  # decodes alone, so it failed on I/O in the pipeline
        except tf.errors.OpError as err:
            reason = tf_error_message(err)
        items.append({"index": int(record["index"]), "id": record["id"].numpy().decode(), "reason": reason})
    return items
