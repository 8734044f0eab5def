"""Stage 1: run a frozen backbone once over a dataset and cache its features.

The input pipeline decodes and resizes in parallel (tf.data) while a compiled
forward pass (`tf.function`, not `model.predict` per batch) runs the backbone in
inference mode. Each finished batch is appended to the store and made durable, so
an interrupted run resumes after its last finished batch.

Images that cannot be decoded are dropped by `ignore_errors` inside the pipeline;
nothing is lost silently, because every record carries its position in the split:
the positions missing from the file are exactly the skipped images, and they are
decoded once more, alone, to report why.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, backbones
from pipeline.config import FeaturesConfig, feature_file_name
from pipeline.data import DataSource, SplitSource, data_fingerprint, load_source
from pipeline.errors import CacheError, DataError
from pipeline.store import FORMAT_VERSION, FeatureWriter, read_attrs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionResult:
    """What a `features` run did; `up_to_date` means it found the file finished."""

    path: Path
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    skipped_items: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return f"features: up to date, nothing to do: {self.path}"
        return (
            f"features: {self.images} images, {self.skipped} skipped, {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} img/s -> {self.path}"
        )


def resolve(config: FeaturesConfig) -> tuple[FeaturesConfig, dict[str, Any], Path]:
    """Resolves the image size and computes the cache key and file path, without TensorFlow work."""
    spec = backbones.get_backbone(config.backbone)
    config = config.resolved(spec.default_size)
    key = config.key(
        data_fingerprint=data_fingerprint(config.data, seed=config.seed),
        weights_identity=backbones.weights_identity(config.weights_arg),
    )
    return config, key, Path(config.output_dir) / feature_file_name(config, key)


def extract_features(config: FeaturesConfig, *, progress: bool = True) -> ExtractionResult:
    """Runs stage 1 for `config`; a finished file with the same key is left as it is."""
    config, key, path = resolve(config)
    if path.exists():
        attrs = read_attrs(path)
        if attrs.get("complete") and attrs.get("key") == key:
            return ExtractionResult(path=path, up_to_date=True)
        raise CacheError(
            f"{path} exists but was built with other settings or is unfinished; it is "
            "never mixed with this run. Delete it to rebuild."
        )
    # The backbone first: missing weights fail in a second, before a dataset download.
    spec = backbones.get_backbone(config.backbone)
    model = backbones.build_extractor(
        spec,
        image_size=config.image_size,
        weights=config.weights_arg,
        pooling=config.pooling,
        mixed_precision=config.mixed_precision,
    )
    source = load_source(
        config.data, seed=config.seed, shard_index=config.shard_index, num_shards=config.num_shards
    )
    attrs = _file_attrs(config, key, source, spec)
    splits = {
        name: {"spec": split.spec, "num_inputs": split.size, "num_inputs_all_shards": split.total}
        for name, split in source.splits.items()
    }
    forward = compiled_forward(model, config.image_size)
    started = time.perf_counter()
    images = 0
    skipped: dict[str, list[dict[str, Any]]] = {}
    with FeatureWriter(path, attrs=attrs, splits=splits, feature_dim=spec.feature_dim, dtype=config.dtype) as writer:
        for split in source.splits.values():
            images += _extract_split(split, writer, forward, config, progress=progress)
            skipped[split.name] = _skipped(split, writer, config)
            if skipped[split.name]:
                for item in skipped[split.name]:
                    log.warning("skipped %s/%s: %s", split.name, item["id"], item["reason"])
                if config.strict:
                    raise DataError(
                        f"{len(skipped[split.name])} image(s) of split '{split.name}' could not be "
                        f"read (first: {skipped[split.name][0]['id']}: {skipped[split.name][0]['reason']}) "
                        "and --strict is set. Fix or remove them, or drop --strict to skip them."
                    )
    seconds = time.perf_counter() - started
    writer.finish(skipped)
    total_skipped = sum(len(v) for v in skipped.values())
    return ExtractionResult(
        path=path, images=images, skipped=total_skipped, seconds=seconds, skipped_items=skipped
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


def decode_and_resize(image_bytes, image_size: int):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> (S, S, 3) float32 in [0, 255].

    `decode_image` sniffs the format from the bytes (a PNG named .jpg works) and
    converts grayscale, RGBA, CMYK and 16-bit images to 8-bit RGB; GIFs give their
    first frame. Resizing is bilinear and does not keep the aspect ratio, like
    `keras.utils.image_dataset_from_directory`.
    """
    import tensorflow as tf

    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size))
    return tf.ensure_shape(image, (image_size, image_size, 3))


def image_batches(split: SplitSource, *, start: int, image_size: int, batch_size: int):
    """Batches of (images, labels, ids, index) from the `start`-th record of the split.

    Undecodable images are dropped here (`ignore_errors`) and accounted for by
    position afterwards; see the module docstring.
    """
    import tensorflow as tf

    ds = split.records(start).map(
        lambda r: (decode_and_resize(r["image"], image_size), r["label"], r["id"], r["index"]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compiled_forward(model, image_size: int):
    """The backbone as one traced graph for every batch size, warmed up.

    The batch dimension is left open so a split's last, smaller batch reuses the
    graph instead of tracing another; the warm-up call pays for the trace before any
    timing starts, as it does for the benchmark's bare forward pass.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    def forward(images):
        return model(images, training=False)

    forward(tf.zeros((1, image_size, image_size, 3))).numpy()
    return forward


def _extract_split(split: SplitSource, writer: FeatureWriter, forward, config: FeaturesConfig, *, progress: bool) -> int:
    from tqdm.auto import tqdm

    rows, last = writer.committed(split.name)
    start = last // config.num_shards + 1 if rows else 0
    if start >= split.size:
        return 0
    done = start
    written = 0
    with tqdm(
        total=split.size, initial=start, desc=split.name, unit="img", disable=not progress,
        dynamic_ncols=True, mininterval=0.5,
    ) as bar:
        for images, labels, ids, index in image_batches(
            split, start=start, image_size=config.image_size, batch_size=config.batch_size
        ):
            features = forward(images).numpy()
            index = index.numpy()
            writer.append(split.name, features, labels.numpy(), index, ids.numpy().tolist())
            written += len(index)
            position = int(index[-1]) // config.num_shards + 1
            bar.update(position - done)
            done = position
        bar.update(split.size - done)
    return written


def _skipped(split: SplitSource, writer: FeatureWriter, config: FeaturesConfig) -> list[dict[str, Any]]:
    """The records of `split` missing from the file, each with the decoder's reason."""
    import tensorflow as tf

    written = set(writer.written_index(split.name).tolist())
    expected = range(config.shard_index, split.total, config.num_shards)
    missing = [p for p in expected if p not in written]
    if not missing:
        return []
    wanted = tf.constant(missing, tf.int64)
    ds = split.records(0).filter(lambda r: tf.reduce_any(tf.equal(r["index"], wanted)))
    items = []
    for record in ds:
        try:
            decode_and_resize(record["image"], config.image_size)
            reason = "could not be read"  # decodes alone, so it failed on I/O in the pipeline
        except tf.errors.OpError as err:
            reason = _clean_tf_message(err)
        items.append({"index": int(record["index"]), "id": record["id"].numpy().decode(), "reason": reason})
    return items


def _clean_tf_message(err: Exception) -> str:
    message = getattr(err, "message", str(err))
    message = message.split("}}", 1)[-1].strip()
    message = message.split(" [Op:", 1)[0].strip()
    return message.splitlines()[0] if message else type(err).__name__

