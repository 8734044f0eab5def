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
this process, or `ray`, on the actors of a Ray cluster (`pipeline.features.ray_engine`).
Both run the same per-range work (`feature_batches`, `view_feature_batches`) and
write through the same `FeatureWriter` in source order, so the file does not say
which engine made it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import MAX_VIEW_POSITION, EngineConfig, FeaturesConfig, ViewsConfig, feature_file_name
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features import backbones
from pipeline.features.engines import Engine, LocalEngine
from pipeline.features.sources import DataSource, SplitSource, data_fingerprint, load_source
from pipeline.features.store import (
    FORMAT_VERSION,
    VIEWS_SPLIT,
    FeatureWriter,
    key_diff,
    partial_path,
    read_attrs,
    read_view_attrs,
    views_identity,
)
from pipeline.images import DECODER, decode_and_resize, tf_error_message
from pipeline.locks import exclusive
from pipeline.phases import Phases

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
        return {
            "stage": "features",
            "path": str(self.path),
            "up_to_date": self.up_to_date,
            "images": self.images,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "view_images": self.view_images,
            "view_seconds": round(self.view_seconds, 3),
            "num_views": self.num_views,
            "phases": self.phases,
        }


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
    spec = backbones.get_backbone(config.backbone, config.weights_arg)
    config = config.resolved(spec.default_size, spec.check_pooling(config.pooling))
    key = config.key(
        data_fingerprint=data_fingerprint(config.data, seed=config.seed),
        weights_identity=backbones.weights_identity(config.weights_arg),
    )
    key["decoder"] = DECODER  # features of EXIF-rotated photos changed with the decoder
    return config, key, Path(config.output_dir) / feature_file_name(config, key)


def extract_features(
    config: FeaturesConfig,
    *,
    views: ViewsConfig | None = None,
    progress: bool = True,
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


def _extract(
    config: FeaturesConfig,
    key: dict[str, Any],
    path: Path,
    *,
    views: ViewsConfig | None,
    progress: bool,
    engine: Engine | None,
    phases: Phases,
) -> ExtractionResult:
    """`extract_features` for a resolved config, under the lock on `path`."""
    views = views if views is not None and views.num_views else None
    extend = None
    if path.exists():
        stored = _finished_views(path, key)
        if not _needs_views(path, stored, views):
            return ExtractionResult(path=path, up_to_date=True, view_attrs=stored)
        extend = path
    # The backbone first: missing weights fail in a second, before a dataset download.
    spec = backbones.get_backbone(config.backbone, config.weights_arg)
    view_images, view_seconds = 0, 0.0
    with (engine or LocalEngine(EngineConfig())).start(config, spec, phases) as runner:
        with phases("list data"):
            source = load_source(
                config.data, seed=config.seed, shard_index=config.shard_index, num_shards=config.num_shards
            )
        if views is not None:
            _check_views_source(source, views)
        started = time.perf_counter()
        earlier = _runtimes_so_far(path, extend)
        attrs = {**_file_attrs(config, key, source, spec), "runtimes": _merged(earlier, runner.runtimes())}
        with _writer(path, attrs, config, source, spec, views, extend) as writer:
            images, skipped = _extract_splits(runner, source, writer, config, phases, progress=progress)
            seconds = time.perf_counter() - started
            if views is not None:
                view_images, view_seconds = runner.extract_views(
                    source.splits[VIEWS_SPLIT], writer, views, progress=progress
                )
    writer.attrs["runtimes"] = _merged(earlier, runner.runtimes())  # after verification: what really ran
    with phases("finish file"):
        writer.finish(skipped)
    return ExtractionResult(
        path=path,
        images=images,
        skipped=sum(len(v) for v in skipped.values()),
        seconds=seconds,
        skipped_items=skipped,
        view_images=view_images,
        view_seconds=view_seconds,
        view_attrs=read_view_attrs(path),
    )


def _runtimes_so_far(path: Path, extend: Path | None) -> list[str]:
    """The runtimes that wrote the rows this run resumes or extends (`Forward.record()`), oldest first.

    At f32 any verified runtime's rows stand in for TensorFlow's, so a file started by one
    runtime is finished by another; the file lists them all.
    """
    for source in (partial_path(path), extend):
        if source is not None and source.exists():
            return list(read_attrs(source).get("runtimes") or [])
    return []


def _merged(earlier: list[str], now: list[str]) -> list[str]:
    return list(dict.fromkeys([*earlier, *now]))


def _finished_views(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The views attributes of the finished file at `path`; a file of other settings is never reused."""
    attrs = read_attrs(path)
    if not (attrs.get("complete") and attrs.get("key") == key):
        raise CacheError(
            f"{path} exists but was built with other settings or is unfinished; it is "
            "never mixed with this run. Delete it to rebuild."
        )
    return read_view_attrs(path)


def _writer(path, attrs, config: FeaturesConfig, source: DataSource, spec, views: ViewsConfig | None, extend):
    """The `FeatureWriter` of this run: the file's attributes, its splits and its views."""
    splits = {
        name: {"spec": split.spec, "num_inputs": split.size, "num_inputs_all_shards": split.total}
        for name, split in source.splits.items()
    }
    view_attrs = None
    if views is not None:
        view_attrs = {
            "num_views": views.num_views,
            "seed": views.seed,
            "augment": views.augment.to_dict(),
            "config": views.to_dict(),
        }
    return FeatureWriter(
        path,
        attrs=attrs,
        splits=splits,
        feature_dim=spec.pooled_dim(config.pooling),
        dtype=config.dtype,
        views=view_attrs,
        extend=extend,
    )


def _extract_splits(
    runner, source: DataSource, writer: FeatureWriter, config: FeaturesConfig, phases: Phases, *, progress: bool
) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """Every split through the runner; returns (images computed, skipped images per split)."""
    images = 0
    skipped: dict[str, list[dict[str, Any]]] = {}
    for split in source.splits.values():
        images += runner.extract_split(split, writer, progress=progress)
        with phases("account for skipped images"):
            skipped[split.name] = _skipped(split, writer, config)
        for item in skipped[split.name]:  # the id as found on disk
            log.warning("skipped %s (split %s): %s", item["id"], split.name, item["reason"])
        if skipped[split.name] and config.strict:
            first = skipped[split.name][0]
            raise DataError(
                f"{len(skipped[split.name])} image(s) of split '{split.name}' could not be "
                f"read (first: {first['id']}: {first['reason']}) "
                "and --strict is set. Fix or remove them, or drop --strict to skip them."
            )
    return images, skipped


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
        "feature_dim": spec.pooled_dim(config.pooling),
        "dtype": config.dtype,
        "shard_index": config.shard_index,
        "num_shards": config.num_shards,
        "package_version": __version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
