"""tensorflow-datasets as a data source: a prepared dataset, its splits sliced as asked, one record per example."""

from __future__ import annotations

import logging

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.features.sources import DataSource, SplitSource
from pipeline.network import unreachable

log = logging.getLogger(__name__)

#: A public host that tfds downloads use (its metadata and many datasets live there): one
#: that cannot be reached means no download will work (`pipeline.network`).
NETWORK_PROBE_HOST = "storage.googleapis.com"


def tfds_source(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1) -> DataSource:
    """Loads a tensorflow-datasets dataset by name, with split slicing.

    Images are read undecoded (`SkipDecoding`) so they go through the same decoder
    as folder images. Ids are tfds's own example ids (`tfds_id`).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(config.dataset, data_dir=config.tfds_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataError(
            f"Unknown tensorflow-datasets name. Received: DATASET={config.dataset!r}. "
            "See `tfds.list_builders()`, or use DATA_DIR=<image folder>."
        ) from err
    _ensure_prepared(builder, config)
    image_key, label_key = _supervised_keys(builder)
    class_names = tuple(builder.info.features[label_key].names)
    splits = {}
    for split, spec in config.splits.items():
        total = int(_tfds_dataset(builder, spec, image_key, config.dataset).cardinality())
        if total < 0:
            raise DataError(f"{config.dataset} split {spec!r} has an unknown number of examples.")
        splits[split] = SplitSource(
            name=split,
            spec=spec,
            size=len(range(shard_index, total, num_shards)),
            total=total,
            records=_tfds_records(builder, spec, image_key, label_key, config.dataset, shard_index, num_shards),
            num_shards=num_shards,
        )
    return DataSource(
        name=config.dataset,
        version=str(builder.info.version),
        class_names=class_names,
        splits=splits,
    )


def _ensure_prepared(builder, config: DataConfig) -> None:
    if builder.is_prepared():
        return
    where = builder.data_dir_root if hasattr(builder, "data_dir_root") else config.tfds_dir
    instead = (
        f"Prepare it where there is a network (`tfds build {config.dataset} --data_dir DIR`), "
        "copy DIR here and pass TFDS_DIR=DIR, or use DATA_DIR=<image folder>."
    )
    if not config.download:
        raise DataError(
            f"tensorflow-datasets '{config.dataset}' is not prepared in {where} and downloads are off. {instead}"
        )
    offline = unreachable(NETWORK_PROBE_HOST)
    if offline:
        raise DataError(
            f"tensorflow-datasets '{config.dataset}' is not prepared in {where}, and this machine cannot "
            f"download it ({offline}). {instead}"
        )
    log.info("Downloading and preparing %s into %s", config.dataset, where)
    try:
        builder.download_and_prepare()
    except Exception as err:  # network failures surface as many types; all are re-raised
        raise DataError(
            f"Could not download tensorflow-datasets '{config.dataset}' into {where} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). {instead}"
        ) from err


def _supervised_keys(builder) -> tuple[str, str]:
    """(image key, label key): the declared supervised keys, or else the one Image and
    the one ClassLabel feature; anything ambiguous is an error, not a guess."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
        if len(images) != 1 or len(labels) != 1:
            raise DataError(
                f"{builder.name} is not an image classification dataset: expected one image "
                f"and one class-label feature, received images={images}, labels={labels}."
            )
        image_key, label_key = images[0], labels[0]
    if not isinstance(features[image_key], tfds.features.Image):
        raise DataError(f"{builder.name}: feature '{image_key}' is not an image.")
    return image_key, label_key


def _tfds_dataset(builder, spec: str, image_key: str, name: str):
    """The split as stored, images left encoded, in a fixed order."""
    import tensorflow_datasets as tfds

    try:
        return builder.as_dataset(
            split=spec,
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
    except (KeyError, ValueError, AssertionError) as err:
        available = ", ".join(sorted(builder.info.splits)) or "see the dataset's catalog page"
        raise DataError(
            f"Split {spec!r} does not exist in {name} ({str(err).splitlines()[0][:200]}). "
            f"Available splits: {available}; slicing such as 'train[:40%]' is allowed."
        ) from err


def _tfds_records(builder, spec, image_key, label_key, name, shard_index, num_shards):
    def records(start: int):
        import tensorflow as tf

        ds = _tfds_dataset(builder, spec, image_key, name).enumerate()
        if num_shards > 1:
            ds = ds.filter(tf.autograph.experimental.do_not_convert(lambda i, _: i % num_shards == shard_index))
        ds = ds.skip(start)
        return ds.map(
            tf.autograph.experimental.do_not_convert(
                lambda i, ex: {
                    "image": ex[image_key],
                    "label": tf.cast(ex[label_key], tf.int64),
                    "id": ex["tfds_id"],
                    "index": i,
                }
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    return records
