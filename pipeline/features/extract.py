"""Stage 1: run a frozen backbone over the images it has not seen, and assemble the features.

A run scans the data (`pipeline.features.scan`: splits and labels from the listing,
each file's content id from the stat cache), and is done at once when the feature file
of these settings records the same scan. Otherwise, holding the lock on the model key's
content store (`pipeline.features.contentstore`), it runs the backbone on exactly the
images whose content the store lacks (`pipeline.features.incremental`), then writes the
feature file afresh from the store (`pipeline.features.assembly`). Renames, moves
between classes or splits, deletions and other split fractions or seeds extract
nothing; unchanged rows are reused bit for bit.

Images that cannot be decoded are dropped by `ignore_errors` inside the pipeline and
decoded once more, alone, to record why; the store keeps that reason, so they are not
tried again until their bytes change.

With `views` (AUG_VIEWS=K), the train images also go through the backbone K more times,
each time augmented by the layers of `pipeline.augment` (shared with stage 3). A view
depends only on (seed, view number, the image's content), so views follow images that
move, and adding images extends the views. Views live in a store of their own per
augmentation and seed; validation and test are never augmented. A run without
AUG_VIEWS keeps the views the file has, extended to new images.

Engines (`ENGINES`, chosen by ENGINE) decide where the backbone runs: `local`, in this
process, or `ray`, on the actors of a Ray cluster (`pipeline.features.ray_engine`). Both
fill the store through the same sink, and the file does not say which engine made it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import EngineConfig, FeaturesConfig, ViewsConfig, feature_file_name, model_key, store_dir_name
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features import backbones
from pipeline.features.engines import Engine, LocalEngine
from pipeline.features.scan import Scan, scan_data
from pipeline.features.store import VIEWS_SPLIT, check_format, read_attrs, read_view_attrs, views_identity
from pipeline.images import decoder_identity
from pipeline.locks import exclusive
from pipeline.phases import Phases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionResult:
    """What a `features` run did; `up_to_date` means it found the file current.

    `images` (`extracted` in JSON) and `seconds` count the images this run put through the
    backbone; `reused` the rows of the file taken from the store. `view_images` and
    `view_seconds` the augmented views it computed. `view_attrs` are the file's
    /train/views attributes. A shard run (NUM_SHARDS > 1) fills the store only: `path`
    is the file a run without shards assembles.
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
    reused: int = 0
    hashed: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def num_views(self) -> int:
        return int(self.view_attrs["num_views"]) if self.view_attrs else 0

    def views_summary(self) -> str:
        """'2 augmented views per train image, 31.2 s and 9.8 MB per view', or '' without views."""
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
            return f"features: up to date, nothing to do ({self.reused} rows): {self.path}{views}"
        if self.images == 0 and self.view_images:
            text = f"features: plain features kept, 0 extracted, {self.reused} reused"
        else:
            text = (
                f"features: {self.images} extracted, {self.reused} reused, {self.skipped} skipped, "
                f"{self.seconds:.1f} s, {self.images_per_second:.1f} img/s"
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
            "extracted": self.images,
            "reused": self.reused,
            "hashed": self.hashed,
            "images": self.images,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "view_images": self.view_images,
            "view_seconds": round(self.view_seconds, 3),
            "num_views": self.num_views,
            "tensorflow_imported": "tensorflow" in sys.modules,
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
    """Resolves the image size and computes the file's key and path, without TensorFlow or a scan."""
    spec = backbones.get_backbone(config.backbone, config.weights_arg)
    config = config.resolved(spec.default_size, spec.check_pooling(config.pooling))
    key = config.key(
        weights_identity=backbones.weights_identity(config.weights_arg),
        decoder=decoder_identity(spec.resize(config.image_size)),
    )
    return config, key, Path(config.output_dir) / feature_file_name(config, key)


def store_path(config: FeaturesConfig, key: dict[str, Any]) -> Path:
    """The content store of the model key: shared by every split setting of the same model."""
    return Path(config.output_dir) / "store" / store_dir_name(key)


def extract_features(
    config: FeaturesConfig,
    *,
    views: ViewsConfig | None = None,
    progress: bool = True,
    engine: Engine | None = None,
) -> ExtractionResult:
    """Runs stage 1 for `config`; a file that records the current scan is left as it is.

    `views` also caches `views.num_views` augmented views of every train image; a file
    with at least as many views of the same augmentation and seed is current. `engine`
    (from `get_engine`) says where the backbone runs, by default in this process; it
    never changes the file.

    One run writes a store at a time: the lock on the store folder
    (`pipeline.locks.exclusive`) is held from the "is it current?" check to the rename
    of the file, so a second run of the same model waits, then finds its rows there.
    """
    phases = Phases()
    with phases("resolve key"):
        config, key, path = resolve(config)
    with phases("scan data"):
        scan = scan_data(config.data, seed=config.seed, cache_dir=Path(config.output_dir))
    views = views if views is not None and views.num_views else None
    found = _current(path, key, scan, views) if config.num_shards == 1 else None
    if found is None:
        with exclusive(store_path(config, key), what="feature store"):
            found = _current(path, key, scan, views) if config.num_shards == 1 else None
            if found is None:
                found = _update(config, key, path, scan, views=views, progress=progress, engine=engine, phases=phases)
    return dataclasses.replace(found, hashed=scan.hashed, phases=phases.record())


def _current(path: Path, key: dict[str, Any], scan: Scan, views: ViewsConfig | None) -> ExtractionResult | None:
    """The up-to-date result when the file at `path` records this scan (and the views asked), else None."""
    if not path.exists():
        return None
    attrs = read_attrs(path)
    check_format(path, attrs)
    if not attrs.get("complete") or attrs.get("key") != key:
        raise CacheError(
            f"{path} exists but was built with other settings or is unfinished; it is "
            "never mixed with this run. Delete it to rebuild."
        )
    if attrs.get("scan") != scan.fingerprint:
        return None
    stored = read_view_attrs(path)
    if views is not None and (
        stored is None or views_identity(stored) != views.identity() or int(stored["num_views"]) < views.num_views
    ):
        return None
    return ExtractionResult(path=path, up_to_date=True, view_attrs=stored, reused=int(attrs.get("num_rows", 0)))


def _effective_views(path: Path, key: dict[str, Any], views: ViewsConfig | None) -> ViewsConfig | None:
    """The views the file gets: those asked, else the file's own (extended to new images).

    With the same augmentation and seed, the file never loses views it has.
    """
    stored = read_view_attrs(path) if path.exists() and read_attrs(path).get("key") == key else None
    if stored is None:
        return views
    have = ViewsConfig.from_dict({**stored["config"], "num_views": int(stored["num_views"])})
    if views is None:
        return have
    if have.identity() == views.identity():
        return dataclasses.replace(views, num_views=max(views.num_views, have.num_views))
    return views


def _update(config, key, path, scan: Scan, *, views, progress, engine, phases: Phases) -> ExtractionResult:
    """Extracts what the store lacks and (without shards) assembles the file; under the store's lock."""
    from pipeline.features.contentstore import open_store, views_dir

    spec = backbones.get_backbone(config.backbone, config.weights_arg)
    views = _effective_views(path, key, views) if config.num_shards == 1 else views
    if views is not None and VIEWS_SPLIT not in scan.splits:
        raise ConfigError(
            f"Augmented views are made of the '{VIEWS_SPLIT}' split, which this dataset lacks. "
            f"Received: splits {', '.join(scan.splits)} and AUG_VIEWS={views.num_views}."
        )
    with phases("open store"):
        directory = store_path(config, key)
        store = open_store(directory, model_key(key), feature_dim=spec.pooled_dim(config.pooling), dtype=config.dtype)
        views_store = None
        if views is not None:
            identity = {**model_key(key), "views": views.identity()}
            views_store = open_store(
                views_dir(directory, views.identity()),
                identity,
                feature_dim=spec.pooled_dim(config.pooling),
                dtype=config.dtype,
            )
    work = _extract(config, spec, scan, (store, views_store), views, engine=engine, progress=progress, phases=phases)
    if config.num_shards > 1:
        return ExtractionResult(path=path, **work.counts())
    _check_strict(scan, store, config)
    with phases("assemble file"):
        result = _assemble(config, key, path, scan, spec, (store, views_store), views, work)
    with phases("compact store"):
        from pipeline.features.gc import compact_if_dead

        compact_if_dead(Path(config.output_dir), store, views_store, lambda each: _live_rows(each, scan, views))
    return result


@dataclass
class _Work:
    """What the backbone did in this run."""

    images: int = 0
    seconds: float = 0.0
    view_images: int = 0
    view_seconds: float = 0.0
    extracted: set[str] = field(default_factory=set)

    def counts(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "seconds": self.seconds,
            "view_images": self.view_images,
            "view_seconds": self.view_seconds,
        }


def _views_needed(scan: Scan, stores, views: ViewsConfig | None) -> bool:
    store, views_store = stores
    if views is None:
        return False
    train = set(scan.splits[VIEWS_SPLIT].content_ids)
    return any((c, v) not in views_store for c in train if store.reason(c) is None for v in range(views.num_views))


def _extract(config, spec, scan: Scan, stores, views, *, engine, progress, phases: Phases) -> _Work:
    """Runs the images the store lacks (and their missing views) through the engine."""
    from pipeline.features.incremental import StoreSink, extract_missing, extract_missing_views, plan_missing

    store, views_store = stores
    missing = plan_missing(scan, store, config)
    work = _Work()
    if not missing.count and not _views_needed(scan, stores, views):
        return work
    unique = len(scan.unique_content())
    log.info("features: %d to extract, %d reused from %s", missing.count, unique - missing.count, store.directory)
    unsharded = dataclasses.replace(config, shard_index=0, num_shards=1)
    with (engine or LocalEngine(EngineConfig())).start(unsharded, spec, phases) as runner:
        with phases("list data"):
            source = _data_source(scan, config)
        started = time.perf_counter()
        segment = store.writer()
        try:
            with segment:
                sink = StoreSink(segment, source.version)
                work.images = extract_missing(runner, source, missing, sink, config, progress)
        finally:  # rows committed before an interruption are reused: say which runtime wrote them
            if segment.rows:
                store.add_runtimes(runner.runtimes())
        work.seconds = time.perf_counter() - started
        work.extracted = {c for _, content in missing.splits.values() for c in content}
        if views is not None:
            with views_store.writer() as segment:
                sink = StoreSink(segment, source.version)
                work.view_images = extract_missing_views(
                    runner, source.splits[VIEWS_SPLIT], scan.splits[VIEWS_SPLIT], stores, sink, views, config, progress
                )
                work.view_seconds = sink.view_seconds
    return work


def _live_rows(store, scan: Scan, views: ViewsConfig | None) -> int:
    """The rows of `store` (plain, or views when it is not the plain one) the current scan uses."""
    if store.identity.get("views") is None:
        return int((store.locate(scan.unique_content()) >= 0).sum())
    contents = list(set(scan.splits[VIEWS_SPLIT].content_ids))
    return sum(int((store.locate(contents, v) >= 0).sum()) for v in range(views.num_views))


def _data_source(scan: Scan, config: FeaturesConfig):
    """The records of the scanned data: the folder listing of the scan itself, or the tfds dataset."""
    from pipeline.features.sources import folder_source
    from pipeline.features.tfds_data import tfds_source

    if scan.listing is not None:
        return folder_source(scan.listing)
    return tfds_source(config.data)


def _check_strict(scan: Scan, store, config: FeaturesConfig) -> None:
    """With --strict, any unreadable image of the scan is an error (its reason is kept in the store)."""
    if not config.strict:
        return
    for name, split in scan.splits.items():
        bad = [(split.ids[r], store.reason(c)) for r, c in enumerate(split.content_ids) if store.reason(c)]
        if bad:
            raise DataError(
                f"{len(bad)} image(s) of split '{name}' could not be read (first: {bad[0][0]}: {bad[0][1]}) "
                "and --strict is set. Fix or remove them, or drop --strict to skip them."
            )


def _assemble(config, key, path: Path, scan: Scan, spec, stores, views, work: _Work) -> ExtractionResult:
    """Writes the file for the scan from the stores and says what the run did."""
    from pipeline.features.assembly import AssembledViews, assemble

    store, views_store = stores
    # At f32 a verified runtime's rows stand in for TensorFlow's: the file lists every runtime whose rows it may hold.
    attrs = {**_file_attrs(config, key, scan, spec, stores), "runtimes": store.runtimes()}
    assembled = None
    if views is not None:
        before = read_view_attrs(path) if path.exists() else None
        seconds = work.view_seconds
        if before is not None and views_identity(before) == views.identity():
            seconds += float(before.get("seconds", 0.0))
        view_attrs = {
            "num_views": views.num_views,
            "seed": views.seed,
            "augment": views.augment.to_dict(),
            "config": views.to_dict(),
            "seconds": round(seconds, 3),
            "seconds_per_view": round(seconds / views.num_views, 3),
        }
        assembled = AssembledViews(views_store, view_attrs, views.num_views)
    written = assemble(path, attrs=attrs, scan=scan, store=store, views=assembled)
    for name, items in written.skipped.items():
        for item in items:  # the id as found on disk
            log.warning("skipped %s (split %s): %s", item["id"], name, item["reason"])
    extracted = work.extracted
    return ExtractionResult(
        path=path,
        **work.counts(),
        skipped=sum(len(v) for v in written.skipped.values()),
        skipped_items=written.skipped,
        view_attrs=read_view_attrs(path),
        reused=sum(len(c) - sum(map(extracted.__contains__, c)) for c in written.content.values()),
    )


def _version(package: str) -> str:
    """An installed package's version, without importing it (a reassembly needs no TensorFlow)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _file_attrs(config: FeaturesConfig, key, scan: Scan, spec, stores) -> dict[str, Any]:
    from pipeline.features.store import FORMAT_VERSION

    store, views_store = stores
    root = Path(config.output_dir)
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "config": config.to_dict(),
        "class_names": list(scan.class_names),
        "class_counts": scan.class_counts,
        "backbone": config.backbone,
        "backbone_family": spec.family,
        "weights": config.weights,
        "weights_identity": key["weights"],
        "image_size": config.image_size,
        "pooling": config.pooling,
        "preprocessing": spec.preprocessing,
        "resize": spec.resize(config.image_size).mode,
        "dataset": scan.name,
        "dataset_version": scan.version or scan.fingerprint,
        "source": key["source"],
        "splits": {name: split.spec for name, split in scan.splits.items()},
        "seed": config.seed,
        "feature_dim": spec.pooled_dim(config.pooling),
        "dtype": config.dtype,
        "shard_index": 0,
        "num_shards": 1,
        "package_version": __version__,
        "tensorflow_version": _version("tensorflow"),
        "keras_version": _version("keras"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "scan": scan.fingerprint,
        "store": store.directory.relative_to(root).as_posix(),
        "views_store": views_store.directory.relative_to(root).as_posix() if views_store is not None else None,
    }
