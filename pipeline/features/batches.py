"""Batches of stage-1 work: a range of a split (or of its augmented views) through the forward pass."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.errors import DataError
from pipeline.features.forward import Forward, InputSchedule
from pipeline.features.sources import SplitSource
from pipeline.features.store import FeatureWriter
from pipeline.images import Resize, decode_and_resize
from pipeline.phases import Phases


def image_batches(
    split: SplitSource,
    *,
    start: int,
    resize: Resize,
    batch_size: int,
    schedule: InputSchedule,
    stop: int | None = None,
):
    """Batches of (images, labels, ids, index) of the records [start, stop) of the split.

    `stop=None` reads to the end. Undecodable images are dropped here
    (`ignore_errors`) and accounted for by position afterwards; see the module docstring.
    `schedule` says when decoding runs relative to the forward pass (`input_schedule`).
    """
    return schedule.batches(
        _records(split, start, stop),
        lambda r: (decode_and_resize(r["image"], resize), r["label"], r["id"], r["index"]),
        batch_size,
    )


def view_batches(
    split: SplitSource, *, keep, resize: Resize, batch_size: int, augment, view: int, schedule: InputSchedule
):
    """Batches of (images, labels, ids, index) of augmented view `view` of the records at positions `keep`.

    Only the positions in `keep` (train rows of the plain features) are read, so images
    skipped there are not tried again. `augment` is
    `pipeline.augment.example_augmenter(...)`: it runs per image, in parallel, after
    decoding, and its result depends only on (seed, view, the record's `view_key`): a hash
    of the image's content, set by `SplitSource.restricted`, else its position.
    """
    return schedule.batches(
        split.at(keep).records(0),
        lambda r: (
            augment(decode_and_resize(r["image"], resize), view, r["view_key"] if "view_key" in r else r["index"]),
            r["label"],
            r["id"],
            r["index"],
        ),
        batch_size,
    )


def _records(split: SplitSource, start: int, stop: int | None):
    records = split.records(start)
    return records if stop is None else records.take(max(0, stop - start))


def feature_batches(
    split: SplitSource,
    forward: Forward,
    *,
    start: int,
    stop: int | None = None,
    resize: Resize,
    batch_size: int,
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
        batches = iter(
            image_batches(
                split,
                start=start,
                stop=stop,
                resize=resize,
                batch_size=batch_size,
                schedule=forward.schedule,
            )
        )
    while True:
        with phases("decode"):  # with the overlap schedule: the wait for decoded images
            batch = next(batches, None)
        if batch is None:
            return
        images, labels, ids, index = batch
        with phases("forward"):
            features = forward(images)
        yield features, labels.numpy(), index.numpy(), ids.numpy().tolist()


def view_feature_batches(
    split: SplitSource,
    forward: Forward,
    augment,
    *,
    view: int,
    positions,
    num_shards: int,
    resize: Resize,
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
        split,
        keep=positions,
        resize=resize,
        batch_size=batch_size,
        augment=augment,
        view=view,
        schedule=forward.schedule,
    ):
        index = index.numpy()
        # Only train rows are read (`keep`), so a difference is a row that failed now.
        expected = positions[row : row + len(index)]
        if not np.array_equal(expected, index):
            raise _lost_view_image(split, view, int(expected[np.argmax(expected != index)]))
        yield forward(images), labels.numpy(), index, np.full(len(index), view, np.int64)
        row += len(index)
    if row != len(positions):
        raise _lost_view_image(split, view, int(positions[row]))


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
