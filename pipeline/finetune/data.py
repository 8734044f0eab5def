"""The images of stage 3 as tf.data input: decoded as stage 1 decodes them, few-shot subsets, predictions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.errors import CacheError, DataError
from pipeline.features.sources import DataSource, SplitSource, load_source, stratified_rows
from pipeline.finetune.job import Job, Origin
from pipeline.images import decode_and_resize
from pipeline.metrics import probabilities


def image_dataset(
    split: SplitSource, image_size: int, batch_size: int, *, binary: bool, shuffle_seed: int | None = None
):
    """Batches of (images (N, S, S, 3) float 0-255, labels) decoded as stage 1 decodes.

    Binary labels are float (N, 1), the shape of the single logit. Unreadable images
    are dropped, as stage 1 drops them.
    """
    import tensorflow as tf

    ds = split.records(0)
    if shuffle_seed is not None:
        # Shuffle the encoded bytes (small), not the decoded images.
        ds = ds.shuffle(split.size, seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(record):
        label = record["label"]
        label = tf.cast(label, tf.float32)[tf.newaxis] if binary else label
        return decode_and_resize(record["image"], image_size), label

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,)) of `model` (logits out) in inference mode.

    `predict_on_batch` reuses the model's one compiled predict function, so every
    evaluation shares a single trace.
    """
    logits, labels = [], []
    for images, y in dataset:
        logits.append(np.asarray(model.predict_on_batch(images), np.float64))
        labels.append(np.asarray(y).reshape(-1))
    return probabilities(np.concatenate(logits)), np.concatenate(labels).astype(np.int64)


def few_shot(split: SplitSource, per_class: int, class_names: Sequence[str], *, seed: int) -> SplitSource:
    """`split` restricted to the examples `make head TRAIN_PER_CLASS=per_class` trains on.

    The subset is chosen by split index (`features.sources.stratified_rows`), so it is the one the
    stage-2 head saw, and the seed workflow of `make bench`/`make compare` trains on the
    same few shots as the heads it is measured against.
    """
    labels, index = [], []
    for label, position in split.records(0).map(lambda r: (r["label"], r["index"])).as_numpy_iterator():
        labels.append(label)
        index.append(position)
    labels, index = np.asarray(labels, dtype=np.int64), np.asarray(index, dtype=np.int64)
    return split.at(index[stratified_rows(labels, index, per_class, list(class_names), seed=seed)])


@dataclass(frozen=True)
class FinetuneData:
    """The data source, loaded once, and the datasets made from it."""

    source: DataSource
    train_split: SplitSource  # the train split, or the few shots of it
    train: Any
    validation: Any
    test: Any | None

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def binary(self) -> bool:
        return len(self.source.class_names) == 2


def load_data(job: Job) -> FinetuneData:
    """Loads the data source once; the datasets and, at the end, the predictions grid use it."""
    source = load_source(job.features.data, seed=job.features.seed)
    _check_source(source, job.origin)
    binary = len(source.class_names) == 2
    train_split = source.splits["train"]
    if job.per_class is not None:
        train_split = few_shot(train_split, job.per_class, source.class_names, seed=job.subset_seed)

    def dataset(split: SplitSource, shuffle_seed: int | None = None):
        return image_dataset(
            split, job.features.image_size, job.config.batch_size, binary=binary, shuffle_seed=shuffle_seed
        )

    test = source.splits.get("test")
    return FinetuneData(
        source,
        train_split,
        train=dataset(train_split, shuffle_seed=job.config.seed),
        validation=dataset(source.splits["validation"]),
        test=None if test is None else dataset(test),
    )


def _check_source(source: DataSource, origin: Origin) -> None:
    missing = [s for s in ("train", "validation") if s not in source.splits]
    if missing:
        raise DataError(
            f"Fine-tuning needs train and validation splits; {source.name} has no "
            f"{' or '.join(missing)} (available: {', '.join(source.splits)})."
        )
    if origin.head is not None and origin.head.n_classes_ != len(source.class_names):
        raise CacheError(
            f"The head in {origin.run_dir} has {origin.head.n_classes_} classes, the data "
            f"{len(source.class_names)}. Retrain the head with `make head`."
        )


def split_predictions(
    model,
    features: FeaturesConfig,
    split: SplitSource,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,), split positions (N,)) of every readable image of `split`."""
    import tensorflow as tf

    records = split.records(0)
    batches = (
        records.map(
            lambda r: (decode_and_resize(r["image"], features.image_size), r["label"], r["index"]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    positions = []

    def images_and_labels():
        for images, labels, index in batches:
            positions.append(np.asarray(index))
            yield images, labels

    proba, labels = predict(model, images_and_labels())
    return proba, labels, np.concatenate(positions).astype(np.int64)
