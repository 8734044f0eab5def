"""The images of stage 3 as tf.data input: decoded as stage 1 decodes them, review decisions applied,
few-shot subsets, predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.decisions import apply_to_splits, digest_cache_for, read_decisions
from pipeline.digests import DigestCache, row_digests
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features.backbones import input_resize
from pipeline.features.data import load_source
from pipeline.features.sources import DataSource, SplitSource, stratified_rows
from pipeline.finetune.job import Job, Origin
from pipeline.images import Resize, decode_and_resize
from pipeline.metrics import probabilities


def image_dataset(
    split: SplitSource, resize: Resize, batch_size: int, *, binary: bool, shuffle_seed: int | None = None
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
        return decode_and_resize(record["image"], resize), label

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


def _listing(split: SplitSource) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, split positions, labels) of every record of `split`, in order."""
    ids, index, labels = [], [], []
    for i, position, label in split.records(0).map(lambda r: (r["id"], r["index"], r["label"])).as_numpy_iterator():
        ids.append(i.decode())
        index.append(position)
        labels.append(label)
    return ids, np.asarray(index, np.int64), np.asarray(labels, np.int64)


def _decided(split: SplitSource, index: np.ndarray, keep: np.ndarray, labels: np.ndarray) -> SplitSource:
    """`split` without its excluded records, relabelled records carrying their new label."""
    table = np.full(split.total, -1, np.int64)
    table[index] = labels
    kept = split.at(index[keep])

    def records(start: int):
        import tensorflow as tf

        lookup = tf.constant(table)
        return kept.records(start).map(lambda r: {**r, "label": tf.gather(lookup, r["index"])})

    return dataclasses.replace(kept, records=records)


def apply_decisions(job: Job, source: DataSource) -> tuple[dict[str, SplitSource], dict[str, Any]]:
    """The source's splits with the job's review decisions applied (`pipeline.decisions.apply_to_splits`).

    Test records change only with DECISIONS_TEST; then the split as given comes back as
    `test_as_given`, so the report can give the test score with and without them.
    """
    data_dir = job.features.data.data_dir
    if not data_dir:
        raise ConfigError(
            f"{job.decisions} holds decisions, but the data is a tfds dataset: decisions are keyed by image "
            "files. Set DECISIONS=none to train without them."
        )
    cache = DigestCache(digest_cache_for(job.decisions))
    listed = {n: _listing(s) for n, s in source.splits.items()}
    applied = apply_to_splits(
        job.decisions,
        read_decisions(job.decisions),
        {n: (row_digests(Path(data_dir), ids, cache), labels) for n, (ids, _, labels) in listed.items()},
        source.class_names,
        test=job.decisions_test,
    )
    splits = {n: _decided(source.splits[n], listed[n][1], applied.keep[n], applied.labels[n]) for n in source.splits}
    if job.decisions_test and "test" in source.splits:
        splits["test_as_given"] = source.splits["test"]
    return splits, applied.record()


@dataclass(frozen=True)
class FinetuneData:
    """The data source, loaded once, and the datasets made from it.

    `test_as_given`: the test split before its review decisions (DECISIONS_TEST only);
    `decisions`: what the decisions did (None without them).
    """

    source: DataSource
    train_split: SplitSource  # the train split, or the few shots of it
    train: Any
    validation: Any
    test: Any | None
    test_as_given: Any | None = None
    decisions: dict[str, Any] | None = None

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
    splits, decisions = apply_decisions(job, source) if job.decisions else (dict(source.splits), None)
    train_split = splits["train"]
    if job.per_class is not None:
        train_split = few_shot(train_split, job.per_class, source.class_names, seed=job.subset_seed)

    resize = input_resize(job.features)

    def dataset(split: SplitSource, shuffle_seed: int | None = None):
        return image_dataset(split, resize, job.config.batch_size, binary=binary, shuffle_seed=shuffle_seed)

    test, given = splits.get("test"), splits.get("test_as_given")
    return FinetuneData(
        source,
        train_split,
        train=dataset(train_split, shuffle_seed=job.config.seed),
        validation=dataset(splits["validation"]),
        test=None if test is None else dataset(test),
        test_as_given=None if given is None else dataset(given),
        decisions=decisions,
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
    resize = input_resize(features)
    batches = (
        records.map(
            lambda r: (decode_and_resize(r["image"], resize), r["label"], r["index"]),
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
