"""Which top-level folders of an image folder are splits, and the hints its errors give.

Split folders are recognised by name (`SPLIT_FOLDER_NAMES`) or by a split word in a
longer name (Kaggle's `training_set/`, `seg_train/`, `trainingSet/`), so that splits
are never taken for classes; a zip's doubled level (`training_set/training_set/`) is
looked through. `labels_hint` is the sentence an error about missing class folders
ends with when the labels are elsewhere (a CSV file, the file names).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import DataError
from pipeline.features.listing import IMAGE_EXTENSIONS, not_data
from pipeline.features.namelabels import looks_labelled

log = logging.getLogger(__name__)

# Split folder names, lower-cased, -> the split they hold. Kaggle uses Training/ and
# Testing/, Roboflow train/ valid/ test/, the TF tutorial's cats_and_dogs_filtered
# train/ validation/.
SPLIT_FOLDER_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}

SPLIT_ORDER = ("train", "validation", "test")


def split_folders(root: Path) -> dict[str, Path] | None:
    """split -> its folder, in SPLIT_ORDER, or None for a flat folder (no sub-folder
    named like a split). Mixed, duplicate or train-less split folders are errors."""
    folders = sorted(e for e in root.iterdir() if e.is_dir() and not not_data(e.name))
    splits = {f: split for f in folders if (split := split_of(f))}
    if splits:
        splits = {f: split for f in folders if (split := split_of(f, beside_splits=True))}
    named = list(splits)
    if not named:
        return None
    others = [f.name for f in folders if f not in named]
    if others:
        raise DataError(
            f"Image folder {root} mixes split folders ({', '.join(f.name for f in named)}) with "
            f"other folders ({', '.join(others)}). Expected either only split folders "
            f"({', '.join(SPLIT_FOLDER_NAMES)}, each with one sub-folder per class) or only "
            "class folders: move the other folders into the splits, or out of the folder."
            + labels_hint([e.name for f in named for e in f.iterdir() if e.is_file()], root)
        )
    by_split: dict[str, list[Path]] = {}
    for folder, split in splits.items():
        by_split.setdefault(split, []).append(folder)
    for split, same in by_split.items():
        if len(same) > 1:
            raise DataError(
                f"Image folder {root} has {len(same)} folders for the {split} split: "
                f"{', '.join(f.name for f in same)}. Expected one: merge them or rename one."
            )
    if "train" not in by_split:
        raise DataError(
            f"Image folder {root} has split folders ({', '.join(f.name for f in named)}) but no "
            "train folder. Expected train/ (or training/) with one sub-folder per class; "
            "rename the split that holds the training images."
        )
    return {split: look_through(by_split[split][0]) for split in SPLIT_ORDER if split in by_split}


def split_of(folder: Path, *, beside_splits: bool = False) -> str | None:
    """The split a top-level folder is named for: a split name (`SPLIT_FOLDER_NAMES`, any
    case), or one split word among the words of the name of a folder that holds folders
    (Kaggle's `training_set/` and `test_set/`, `seg_train/`, `trainingSet/`, COCO's
    `val2017/`), so that such splits are never taken for two classes. `beside_splits`: the
    folder has split folders beside it, so one named so that holds only images is an
    unlabelled split (Kaggle's `test1/`, `testSet/`), not a class."""
    name = folder.name.lower()
    if name in SPLIT_FOLDER_NAMES:
        return SPLIT_FOLDER_NAMES[name]
    words = {SPLIT_FOLDER_NAMES.get(word.lower()) for word in re.findall("[A-Z]?[a-z]+|[A-Z]+(?![a-z])", folder.name)}
    words.discard(None)
    if len(words) != 1:
        return None
    if beside_splits or any(e.is_dir() and not not_data(e.name) for e in (_doubled(folder) or folder).iterdir()):
        return words.pop()
    return None


def _doubled(folder: Path) -> Path | None:
    """The one folder in `folder`, if it has the same name and no image lies beside it: the
    doubled level of a zip extracted into a folder of its name (Kaggle's
    `training_set/training_set/`, with a README or a file list beside it at times)."""
    folders = [e for e in folder.iterdir() if e.is_dir() and not not_data(e.name)]
    if len(folders) != 1 or folders[0].name.lower() != folder.name.lower():
        return None
    if any(e.suffix.lower() in IMAGE_EXTENSIONS and e.is_file() for e in folder.iterdir()):
        return None  # images beside it: `folder` holds data of its own
    return folders[0]


def look_through(folder: Path) -> Path:
    """`folder`, or its doubled level (`_doubled`), which is then the one listed."""
    inner = _doubled(folder)
    if inner is None:
        return folder
    log.info("Looking through %s: it holds nothing but %s", folder, inner.name)
    return inner


def labels_hint(images: Sequence[str], *folders: Path) -> str:
    """For images whose labels are in a CSV file (Kaggle's train.csv, Roboflow's _classes.csv)
    or in their file names (Kaggle's Dogs vs. Cats: cat.0.jpg)."""
    # Kaggle puts sample_submission.csv and test.csv beside train.csv: they hold no labels, so come last.
    tables = sorted(
        {p.name for folder in folders for p in folder.glob("*.csv")},
        key=lambda name: (any(w in name.lower() for w in ("submission", "test")), name),
    )
    if tables:
        return (
            f" The labels are in {', '.join(tables)}? Pass LABELS={tables[0]} "
            "(docs/features.md, 'Labels in a CSV file')."
        )
    example = looks_labelled([path[path.rfind("/") + 1 :] for path in images])
    if example:
        return (
            f" The file names hold the labels ({example})? Pass LABELS=name (docs/features.md, 'Labels in file names')."
        )
    return ""
