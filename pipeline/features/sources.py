"""Data sources: a tensorflow-datasets name or an image folder, one return type.

Every source yields, per split, records of *encoded* image bytes with their label,
a stable id and their position in the split. Decoding happens later, in one place
(`pipeline.features.extract`), so both sources share the same handling of bad images, and
positions make resumption and sharding exact: shard I of N holds the positions
p with p % N == I, and a resumed run restarts at a position, never at a guess.

TensorFlow is imported inside the functions that need it: a no-op rerun (features
already cached) only scans the folder and should not pay TensorFlow's import. The
functions handed to tf.data hold no Python control flow, so they are traced as
written (`do_not_convert`): autograph's conversion cost the first pipeline of a run
a tenth of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import DataConfig
from pipeline.errors import ConfigError, DataError
from pipeline.features.carving import carve, seeded_rank
from pipeline.features.csvlabels import labelled_files
from pipeline.features.listing import (
    IMAGE_EXTENSIONS,
    is_utf8,
    list_images,
    non_utf8_names,
    not_data,
    undecoded_photos,
)
from pipeline.features.namelabels import labelled_by_name, name_pattern
from pipeline.features.splitfolders import (
    SPLIT_FOLDER_NAMES,
    SPLIT_ORDER,
    labels_hint,
    look_through,
    split_folders,
    split_of,
)

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSource:
    """One split of a source, restricted to one shard.

    `records(start)` is a `tf.data.Dataset` of dicts with keys `image` (encoded
    bytes, tf.string), `label` (int64), `id` (tf.string) and `index` (int64, the
    position in the full, unsharded split), beginning at the `start`-th record of
    this shard, in a fixed order.
    """

    name: str
    spec: str
    size: int
    total: int
    records: Callable[[int], tf.data.Dataset] = field(repr=False, compare=False)
    num_shards: int = 1  # shard I of N holds the positions p with p % N == I: record p // N
    #: For a split made by `restricted`: (positions in the whole split, view keys, its size).
    origin: tuple | None = field(default=None, repr=False, compare=False)
    #: positions -> a `records` function over those positions alone, reading no other record
    #: (image folders; without it `restricted` filters the records read, as `at` does).
    select: Callable | None = field(default=None, repr=False, compare=False)

    def at(self, positions: Sequence[int]) -> SplitSource:
        """This split restricted to the records at `positions` (split positions of this shard), in split order.

        The one "keep the records at these positions" filter of the pipeline (few
        shots, augmented views, skipped images, pictures). `records(start)` of the
        result begins at its `start`-th position and ends at the last one, reading the
        source only between them, so neither a resumed read nor a shard of a cluster
        run rescans the rest of the split.
        """
        import numpy as np

        chosen = np.unique(np.asarray(positions, np.int64))
        if len(chosen) and not 0 <= chosen[0] <= chosen[-1] < self.total:
            raise DataError(
                f"Positions of split '{self.name}' must lie in 0-{self.total - 1}. "
                f"Received: {int(chosen[0])}-{int(chosen[-1])}."
            )
        wanted = np.zeros(self.total, bool)
        wanted[chosen] = True
        base, num_shards = self.records, self.num_shards

        def records(start: int):
            import tensorflow as tf

            mask = tf.constant(wanted)
            first = int(chosen[start]) // num_shards if start < len(chosen) else self.size
            # Read no further than the last chosen record: a shard of a large split costs its own length.
            stop = int(chosen[-1]) // num_shards + 1 if start < len(chosen) else first
            return (
                base(first)
                .take(stop - first)
                .filter(tf.autograph.experimental.do_not_convert(lambda r: tf.gather(mask, r["index"])))
            )

        return dataclasses.replace(self, size=len(chosen), records=records)

    def restricted(self, positions: Sequence[int], view_keys: Sequence[int]) -> SplitSource:
        """The records at sorted `positions` of this (unsharded) split, numbered 0..k-1.

        What an engine runs when only some images lack features: record r is the one at
        `positions[r]`, its `index` is r, and it carries `view_key` = `view_keys[r]`, the
        number an augmented view's randomness derives from (so a view depends on the
        image's content, not its place). `origin` keeps the mapping, which is all a
        cluster worker needs to rebuild this split from its own source.
        """
        import numpy as np

        positions = np.asarray(positions, np.int64)
        keys = np.asarray(view_keys, np.int64)
        if self.num_shards != 1 or (len(positions) > 1 and (np.diff(positions) <= 0).any()):
            raise DataError(f"Split '{self.name}' can only be restricted unsharded, to increasing positions.")
        chosen = self.select(positions) if self.select is not None else self.at(positions).records

        def records(start: int):
            import tensorflow as tf

            table, key_table = tf.constant(positions), tf.constant(keys)

            def renumber(r):
                row = tf.searchsorted(table, r["index"][None], out_type=tf.int64)[0]
                return {**r, "index": row, "view_key": tf.gather(key_table, row)}

            return chosen(start).map(tf.autograph.experimental.do_not_convert(renumber))

        return dataclasses.replace(
            self,
            size=len(positions),
            total=len(positions),
            records=records,
            origin=(positions, keys, self.total),
            select=None,
        )


@dataclass(frozen=True)
class DataSource:
    """A dataset ready for extraction: sorted class names and its splits."""

    name: str
    version: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitSource]
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)


# --- image folders ---------------------------------------------------------------


@dataclass(frozen=True)
class FolderScan:
    """The files of an image folder, assigned to splits; no image is opened yet.

    `layout` names the layout recognised and what was carved (see `FOLDER_LAYOUTS`);
    `warnings` are the surprises worth a user's attention, logged by `folder_source`.
    """

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)]
    layout: str
    ignored: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    #: path -> size in bytes, when the caller has stat'ed every file already (the stat cache); else stat'ed here.
    sizes: Mapping[str, int] | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the listing (splits, labels, paths, sizes): how a cluster worker checks it reads the
        driver's data. Not a cache key: features are found by content (`pipeline.features.scan`)."""
        return _fingerprint(self.root, self.splits, self.sizes)


Files = dict[str, list[tuple[str, int]]]


@dataclass(frozen=True)
class FolderLayout:
    """A recognised folder layout: its name (stored in split specs) and how it carves
    the splits it lacks out of train (`pipeline.features.carving`).
    `carve(files, config, seed, class_names)` -> files."""

    name: str
    carve: Callable[[Files, DataConfig, int, Sequence[str]], Files]


def _as_given(files: Files, config: DataConfig, seed: int, class_names: Sequence[str]) -> Files:
    return files


def _carve_validation(files: Files, config: DataConfig, seed: int, class_names: Sequence[str]) -> Files:
    names = ("validation", "train")
    validation, train = carve(files["train"], (config.val_fraction,), seed, names=names, class_names=class_names)
    return {"train": train, "validation": validation, "test": files["test"]}


def _carve_validation_and_test(files: Files, config: DataConfig, seed: int, class_names: Sequence[str]) -> Files:
    fractions, names = (config.test_fraction, config.val_fraction), ("test", "validation", "train")
    test, validation, train = carve(files["train"], fractions, seed, names=names, class_names=class_names)
    return {"train": train, "validation": validation, "test": test}


# Which splits have labelled folders -> the layout. A flat folder (class folders at
# the top) is the train-only case with its classes one level up.
FOLDER_LAYOUTS = {
    "flat": FolderLayout("flat, validation+test carved", _carve_validation_and_test),
    "csv": FolderLayout("labels from a CSV file, validation+test carved", _carve_validation_and_test),
    "names": FolderLayout("labels from file names, validation+test carved", _carve_validation_and_test),
    ("train",): FolderLayout("train only, validation+test carved", _carve_validation_and_test),
    ("train", "test"): FolderLayout("train+test, validation carved", _carve_validation),
    ("train", "validation"): FolderLayout("presplit", _as_given),
    ("train", "validation", "test"): FolderLayout("presplit", _as_given),
}


def scan_folder(config: DataConfig, *, seed: int) -> FolderScan:
    """Lists and splits an image folder; deterministic for a given seed.

    Two kinds of folder are understood::

        root/                          root/
          cats/                          train/        (or training/, any case)
            cat.0.jpg ...                  cats/cat.0.jpg ...
          dogs/                            dogs/...
            ...                          validation/   (or val/, valid/; optional)
                                           cats/ ... dogs/ ...
                                         test/         (or testing/; optional)
                                           cats/ ... dogs/ ...

    Left, a flat folder: classes at the top, split into train/validation/test by
    `val_fraction` and `test_fraction`, stratified by class and seeded
    (`pipeline.features.carving`: exact per-class quotas of a seeded ranking of the paths,
    so adding images moves few earlier ones between splits). Right, a split
    folder, recognised by any top-level sub-folder named like a split; then every one
    must be (a mix of split and class folders is an error, not a guess). Splits given
    are used as given; a missing validation split is carved out of train by
    `val_fraction`, a missing test split (with validation missing too) by
    `test_fraction`. A split folder with images but no class sub-folders (Kaggle's
    unlabelled test/) is not used, with a warning. `test_from_validation` then moves
    that fraction of validation to test. Hidden files and files without an image
    extension are ignored and logged; class folders are searched recursively.
    """
    root = Path(config.data_dir).expanduser()
    if not root.is_dir():
        archive = root.is_file() and root.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar"))
        raise DataError(
            f"Image folder not found: expected a directory with one sub-folder per "
            f"class. Received: DATA_DIR={config.data_dir!r}"
            + (", an archive: extract it (`unzip`, `tar -xf`) and pass the folder." if archive else ".")
        )
    top = look_through(root)  # the folder whose layout is read; ids stay relative to DATA_DIR
    ignored: list[str] = []
    warnings: list[str] = []
    split_dirs = None if config.labels else split_folders(top)
    if config.labels:
        layout, class_names, files = _list_labelled(config.labels, top, root, ignored, warnings)
    elif split_dirs is None:
        layout = FOLDER_LAYOUTS["flat"]
        classes = _list_classes(top, root, ignored)
        class_names = tuple(sorted(classes))
        files = {"train": [(path, label) for label, c in enumerate(class_names) for path in classes[c]]}
    else:
        ignored += [e.name for e in sorted(top.iterdir()) if not_data(e.name) or not e.is_dir()]
        layout, class_names, files = _list_presplit(split_dirs, root, ignored, warnings)
    warnings += undecoded_photos(ignored) + non_utf8_names(ignored, root)
    _check_classes(class_names, top)
    warnings += _look_alike_classes(class_names)
    files = layout.carve({"validation": [], "test": [], **files}, config, seed, class_names)
    layout_name = layout.name
    if config.test_from_validation:
        files = _test_from_validation(files, root, config, seed, class_names)
        layout_name += ", test carved from validation"
    files = {split: files[split] for split in SPLIT_ORDER if files[split]}
    return FolderScan(
        root=root,
        class_names=class_names,
        splits=files,
        layout=layout_name,
        ignored=tuple(ignored),
        warnings=tuple(warnings),
    )


def _list_labelled(labels: str, top: Path, root: Path, ignored: list[str], warnings: list[str]):
    """(layout, class names, files per split) of the folder `top` (`root`, or its doubled
    level) labelled by LABELS (`_labellers`); paths relative to `root`."""
    whole, labellers = _labellers(labels, top)
    listed: dict[str, dict[str, list[str]]] = {}
    for split, (directory, labeller) in labellers.items():
        images = list_images(directory, root, ignored)
        try:
            labelled, notes = labeller(images)
        except DataError as err:  # a photo format left out may be why no image matched
            raise DataError(" ".join([str(err), *undecoded_photos(ignored)])) from err
        warnings += notes
        for path, label in sorted(labelled.items()):
            listed.setdefault(split, {}).setdefault(label, []).append(path)
    if "train" not in listed:
        found = f"No image under {top} has a label from LABELS={labels!r}."
        raise DataError(" ".join([found, *warnings, *undecoded_photos(ignored)]))
    return (FOLDER_LAYOUTS[whole or tuple(listed)], *_by_class_index(listed))


def _labellers(labels: str, root: Path) -> tuple[str | None, dict[str, tuple[Path, Callable]]]:
    """(the layout of a folder labelled as one, or None for one kept in its splits; split ->
    (its folder, a function from its images to ({path: label}, warnings))).

    File names (`name`, `name:<regex>`) label the split folders, if the folder holds only
    those, else the whole folder (Kaggle's Dogs vs. Cats: train/ and an unlabelled test1/).
    A CSV file labels the whole folder (Kaggle's train.csv), or, found in each split
    folder under that name, its split (Roboflow's _classes.csv).
    """
    pattern = name_pattern(labels)
    if pattern is not None:
        by_name = functools.partial(labelled_by_name, pattern, labels)
        folders = [e for e in root.iterdir() if e.is_dir() and not not_data(e.name)]
        if folders and all(split_of(f) for f in folders):
            return None, {split: (directory, by_name) for split, directory in split_folders(root).items()}
        return "names", {"train": (root, by_name)}
    whole = _find_table(labels, root)
    if whole:
        return "csv", {"train": (root, functools.partial(labelled_files, whole))}
    tables = _split_tables(labels, root)
    return None, {split: (d, functools.partial(labelled_files, table)) for split, (d, table) in tables.items()}


def _find_table(labels: str, root: Path) -> Path | None:
    """LABELS as given, or relative to the image folder (where Kaggle puts train.csv's images)."""
    return next((t for t in (Path(labels).expanduser(), root / labels) if t.is_file()), None)


def _labels_table(labels: str, root: Path) -> Path:
    table = _find_table(labels, root)
    if table is None:
        raise DataError(f"Labels file not found. Received: LABELS={labels!r} (looked in ., {root} and its splits).")
    return table


def _split_tables(labels: str, root: Path) -> dict[str, tuple[Path, Path]]:
    """split -> (its folder, its table named LABELS), for split folders that each hold one (Roboflow's export)."""
    tables = {
        split: (directory, directory / labels)
        for split, directory in (split_folders(root) or {}).items()
        if (directory / labels).is_file()
    }
    if "train" not in tables:
        _labels_table(labels, root)  # raises, naming where it looked
    return tables


def _list_presplit(split_dirs: dict[str, Path], root: Path, ignored: list[str], warnings: list[str]):
    """(layout, class names, files per split) of a folder of split folders."""
    listed = {}
    for split, directory in split_dirs.items():
        classes = _list_split(split, directory, root, ignored, warnings)
        if classes is not None:
            listed[split] = classes
    return (FOLDER_LAYOUTS[tuple(listed)], *_by_class_index(listed))


def _by_class_index(listed: dict[str, dict[str, list[str]]]) -> tuple[tuple[str, ...], Files]:
    """split -> class -> paths, as (class names: train's, sorted; split -> [(path, class index)])."""
    class_names = tuple(sorted(listed["train"]))
    for split, classes in listed.items():
        extra = sorted(set(classes) - set(class_names))
        if extra:
            raise DataError(
                f"Split '{split}' has classes that train lacks: {', '.join(extra)}. "
                f"Expected a subset of: {', '.join(class_names)}."
            )
    index = {name: i for i, name in enumerate(class_names)}
    files = {
        split: [(path, index[c]) for c in sorted(classes) for path in classes[c]] for split, classes in listed.items()
    }
    return class_names, files


def _test_from_validation(files: Files, root: Path, config: DataConfig, seed: int, class_names) -> Files:
    """Moves `test_from_validation` of validation to test (the TF tutorial's split)."""
    if files["test"]:
        raise ConfigError(
            "test_from_validation carves a test split out of validation, but "
            f"{root} already has a test split. Received: "
            f"test_from_validation={config.test_from_validation}."
        )
    fraction, names = (config.test_from_validation,), ("test", "validation")
    test, validation = carve(files["validation"], fraction, seed + 1, names=names, class_names=class_names)
    files["test"], files["validation"] = test, validation
    return files


def _list_split(
    split: str, directory: Path, root: Path, ignored: list[str], warnings: list[str]
) -> dict[str, list[str]] | None:
    """The classes of a split folder, or None (with a warning) for one without class
    sub-folders, whose images have no label; a train folder like that is an error."""
    has_classes = any(e.is_dir() and not not_data(e.name) for e in directory.iterdir())
    if not has_classes:
        loose = list_images(directory, root, [])
        if split == "train":
            raise DataError(
                f"Expected one sub-folder per class in the train folder {directory}. Received: "
                f"{len(loose)} images and no sub-folders, so no labels. Sort the images into "
                f"class sub-folders (train/<class>/<image>).{labels_hint(loose, directory, root)}"
            )
        if loose:
            warnings.append(
                f"The {split} folder {directory} has {len(loose)} images but no class sub-folders: "
                f"they are unlabelled and not used. To classify them, use "
                f"`make predict IMAGES={directory}` after `make head`."
            )
        else:
            warnings.append(f"The {split} folder {directory} is empty: not used.")
        return None
    classes = _list_classes(directory, root, ignored)
    for name in classes:
        if name.lower() in SPLIT_FOLDER_NAMES:
            warnings.append(
                f"Class folder {directory / name} is named like a split folder; it is used as "
                f"the class '{name}' of the {split} split. If it holds a split, move it up to {root}."
            )
    return classes


def _list_classes(directory: Path, root: Path, ignored: list[str]) -> dict[str, list[str]]:
    """Maps each class sub-folder of `directory` to its image paths (relative to root)."""
    classes: dict[str, list[str]] = {}
    for entry in sorted(directory.iterdir()):
        relative = entry.relative_to(root).as_posix()
        if not_data(entry.name):
            ignored.append(relative)
        elif entry.is_dir():
            if not is_utf8(entry.name):
                raise DataError(
                    f"Class name {os.fsencode(entry.name)!r} in {directory} is not UTF-8 (a zip made on Windows?). "
                    f"Rename it: `convmv -f cp1252 -t utf8 -r --notest {root}`."
                )
            left_out = len(ignored)
            classes[entry.name] = list_images(entry, root, ignored)
            if not classes[entry.name]:
                raise DataError(
                    f"Class folder {entry} has no images (expected files ending in "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Add images or remove the folder."
                    + "".join(f" {note}" for note in undecoded_photos(ignored[left_out:]))
                )
        else:
            ignored.append(relative)
    return classes


def _check_classes(class_names: Sequence[str], root: Path) -> None:
    if len(class_names) < 2:
        raise DataError(
            f"Expected at least 2 class sub-folders in {root}. Received: "
            f"{len(class_names)} ({', '.join(class_names) or 'none'}). A classifier needs "
            f"one sub-folder per class.{labels_hint([e.name for e in root.iterdir() if e.is_file()], root)}"
            + _one_level_down(root, class_names)
        )


def _one_level_down(root: Path, class_names: Sequence[str]) -> str:
    """For a folder whose one class folder holds the classes (`dataset/images/<class>/`)."""
    folder = root / class_names[0] if len(class_names) == 1 else None
    if folder is None or not folder.is_dir():
        return ""
    inner = sorted(e.name for e in folder.iterdir() if e.is_dir() and not not_data(e.name))
    if len(inner) < 2:
        return ""
    shown = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
    return f" {folder.name}/ holds folders ({shown}): if they are the classes, pass DATA_DIR={folder}."


def _look_alike_classes(class_names: Sequence[str]) -> list[str]:
    """A warning naming classes that differ only in case, spaces, `_` or `-` (`Cat/` and `cat/`
    from two sources): each is a class of its own, which is rarely what was meant."""
    groups: dict[str, list[str]] = {}
    for name in class_names:
        groups.setdefault(re.sub(r"[\s_-]+", " ", name).strip().casefold(), []).append(name)
    alike = [" and ".join(repr(n) for n in names) for names in groups.values() if len(names) > 1]
    if not alike:
        return []
    return [
        f"Classes {'; '.join(alike)} differ only in case, spaces or separators: each is a class of its own. "
        "Merge their folders (or labels) if they are one class."
    ]


def _fingerprint(root: Path, files: dict[str, list[tuple[str, int]]], sizes: Mapping[str, int] | None) -> str:
    """Hash of every file's split, label, path and size (from `sizes`, or stat'ed)."""
    if sizes is None:
        sizes = {path: os.stat(os.path.join(root, path)).st_size for entries in files.values() for path, _ in entries}
    digest = hashlib.sha256()
    for split in sorted(files):
        digest.update("".join(f"{split}\t{label}\t{path}\t{sizes[path]}\n" for path, label in files[split]).encode())
    return "folder-sha256:" + digest.hexdigest()[:16]


def folder_source(scan: FolderScan, *, shard_index: int = 0, num_shards: int = 1) -> DataSource:
    """Wraps a `FolderScan` as a `DataSource` (one shard of it)."""
    for warning in scan.warnings:
        log.warning("%s", warning)
    if scan.ignored:
        shown = ", ".join(scan.ignored[:5]) + (", ..." if len(scan.ignored) > 5 else "")
        log.info("Ignored %d hidden, non-image or archive entries under %s: %s", len(scan.ignored), scan.root, shown)
    splits = {}
    for split, entries in scan.splits.items():
        mine = entries[shard_index::num_shards]
        splits[split] = SplitSource(
            name=split,
            spec=f"folder:{scan.layout}:{split}",
            size=len(mine),
            total=len(entries),
            records=_folder_records(scan.root, entries, range(shard_index, len(entries), num_shards)),
            select=functools.partial(_folder_records, scan.root, entries),
            num_shards=num_shards,
        )
    counts = {
        split: {scan.class_names[k]: n for k, n in sorted(Counter(l for _, l in e).items())}
        for split, e in scan.splits.items()
    }
    return DataSource(
        name=scan.root.resolve().name,
        version=scan.fingerprint,
        class_names=scan.class_names,
        splits=splits,
        class_counts=counts,
    )


def _folder_records(root: Path, entries, positions):
    """Records of the files at split `positions` of `entries` (the whole split), in that order:
    a shard's positions, or (`SplitSource.select`) the ones a restricted split needs."""

    def records(start: int):
        import tensorflow as tf

        chosen = [entries[p] for p in positions[start:]]
        paths = [str(root / path) for path, _ in chosen]
        ids = [path for path, _ in chosen]
        labels = [label for _, label in chosen]
        positions_left = [int(p) for p in positions[start:]]
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "path": tf.constant(paths, tf.string),
                "label": tf.constant(labels, tf.int64),
                "id": tf.constant(ids, tf.string),
                "index": tf.constant(positions_left, tf.int64),
            }
        )
        return ds.map(
            tf.autograph.experimental.do_not_convert(
                lambda r: {"image": tf.io.read_file(r["path"]), **{k: r[k] for k in ("label", "id", "index")}}
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    return records


# --- tensorflow-datasets ------------------------------------------------------------


# --- subsets ----------------------------------------------------------------------


def stratified_rows(
    labels: np.ndarray, index: np.ndarray, per_class: int, class_names: list[str], *, seed: int
) -> np.ndarray:
    """Sorted rows of a seeded subset with `per_class` examples of every class.

    Each class keeps the examples whose split `index` ranks first under a seeded hash,
    so the choice depends on the examples, not on their rows: the head on cached
    features and stage 3 on images (which may hold images the cache skipped) pick
    the same ones. A class with fewer than `per_class` examples is an error, not a
    smaller class.
    """
    import numpy as np

    counts = np.bincount(labels, minlength=len(class_names))
    short = [f"{class_names[c]}: {int(n)}" for c, n in enumerate(counts) if n < per_class]
    if short:
        raise ConfigError(
            f"TRAIN_PER_CLASS={per_class} needs that many train examples in every class. Received: "
            f"{', '.join(short)}. Lower TRAIN_PER_CLASS."
        )
    ranks = np.array([int.from_bytes(seeded_rank(seed, int(i)), "big") for i in index], dtype=np.uint64)
    rows = []
    for c in range(len(class_names)):
        members = np.flatnonzero(labels == c)
        rows.append(members[np.argsort(ranks[members], kind="stable")[:per_class]])
    return np.sort(np.concatenate(rows))
