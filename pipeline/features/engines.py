"""Engines: where the backbone runs (this process, or a Ray cluster), chosen by ENGINE."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from pipeline.config import EngineConfig, FeaturesConfig, ViewsConfig
from pipeline.errors import ConfigError
from pipeline.features import backbones
from pipeline.features.batches import feature_batches, resume_position, view_feature_batches, views_left
from pipeline.features.forward import Forward
from pipeline.features.sources import SplitSource
from pipeline.features.store import FeatureWriter
from pipeline.images import Resize
from pipeline.phases import Phases

log = logging.getLogger(__name__)


class Runner(Protocol):
    """An engine started for one run: it fills the writer's splits and views in source order."""

    def extract_split(self, split: SplitSource, writer: FeatureWriter, *, progress: bool) -> int:
        """Appends the features of `split` after its committed rows; returns the rows computed."""

    def extract_views(
        self, split: SplitSource, writer: FeatureWriter, views: ViewsConfig, *, progress: bool
    ) -> tuple[int, float]:
        """Appends the missing views of the train rows; returns (rows computed, seconds)."""

    def runtimes(self) -> list[str]:
        """The inference runtimes computing this run's features (`Forward.record()`), for the file."""


class Engine(Protocol):
    def start(
        self, config: FeaturesConfig, spec: backbones.BackboneSpec, phases: Phases
    ) -> AbstractContextManager[Runner]:
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
            from pipeline.features.extractor import build_extractor
        with phases("build model"):
            model = build_extractor(
                spec,
                image_size=config.image_size,
                weights=config.weights_arg,
                pooling=config.pooling,
                mixed_precision=config.mixed_precision,
            )
        from pipeline.features.runtimes import forward_for

        yield LocalRunner(forward_for(model, config, spec, phases), config, phases, spec.resize(config.image_size))


def _ray_engine(config: EngineConfig) -> Engine:
    from pipeline.features.ray_engine import RayEngine  # imports ray only when asked for

    return RayEngine(config)


#: Engine name (ENGINE) -> factory taking the `EngineConfig`.
ENGINES: dict[str, Callable[[EngineConfig], Engine]] = {"local": LocalEngine, "ray": _ray_engine}


def get_engine(config: EngineConfig) -> Engine:
    if config.name not in ENGINES:
        raise ConfigError(f"Unknown engine {config.name!r}. Expected one of: {', '.join(sorted(ENGINES))}.")
    return ENGINES[config.name](config)


class LocalRunner:
    """The local engine's work: whole splits through one forward pass, committed batch by batch."""

    def __init__(self, forward: Forward, config: FeaturesConfig, phases: Phases, resize: Resize) -> None:
        self.forward = forward
        self.config = config
        self.phases = phases
        self.resize = resize

    def runtimes(self) -> list[str]:
        """The runtime that computed this run's features (what the feature file records)."""
        return [self.forward.record()]

    def extract_split(self, split: SplitSource, writer: FeatureWriter, *, progress: bool) -> int:
        from tqdm.auto import tqdm

        config = self.config
        start = resume_position(writer, split.name, config.num_shards)
        if start >= split.size:
            return 0
        done = start
        written = 0
        with tqdm(
            total=split.size,
            initial=start,
            desc=split.name,
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        ) as bar:
            for features, labels, index, ids in feature_batches(
                split,
                self.forward,
                start=start,
                resize=self.resize,
                batch_size=config.batch_size,
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
            total=total,
            initial=done,
            desc=f"{split.name} views",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        ) as bar:
            while done < total:
                view, row = divmod(done, n)
                for features, labels, index, view_column in view_feature_batches(
                    split,
                    self.forward,
                    augment,
                    view=view,
                    positions=source_index[row:],
                    num_shards=config.num_shards,
                    resize=self.resize,
                    batch_size=config.batch_size,
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
