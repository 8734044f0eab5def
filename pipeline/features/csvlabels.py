"""Labels from a CSV file (LABELS=...), for image folders without class sub-folders.

Kaggle competitions ship `train.csv` (an image id and its label per row) beside a flat
folder of images, Roboflow's CSV export `_classes.csv` (a file name, then one 0/1 column
per class), and the Hugging Face imagefolder `metadata.csv` or `metadata.jsonl` (a
`file_name` and a `label` per row, one file per split folder). All are read here into
the (path, label) listing that class folders would give, so everything downstream
(splits, cache, audit, review) is unchanged.

The image column is the first one named like an image (`IMAGE_COLUMNS`), else the first
column. The label is the one other column, or the column named like a label
(`LABEL_COLUMNS`), or, with one 0/1 column per class, the name of the column holding 1.
A row names its image by relative path, with or without its extension, or by file name;
a name that matches several images is an error, not a guess. Rows whose image is missing and images no row
names are counted in warnings; a row with two labels is an error: this is single-label
classification.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import DataError

IMAGE_COLUMNS = ("filename", "file_name", "file", "image", "image_id", "image_name", "img", "path", "id")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "breed", "species")
_ONE_HOT = {"0", "1", "0.0", "1.0"}


def labelled_files(table: Path, images: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({image path: label}, warnings) from `table`, given the folder's `images` (paths
    relative to it, as the scan lists them)."""
    header, rows = _read(table)
    image_column, labels = _columns(table, header, rows)
    candidates = _resolver(images)
    listed: dict[str, str] = {}
    missing: list[str] = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        label, name = labels(number, row), (row[image_column] or "").strip()
        found = candidates(name)
        if len(found) > 1:
            raise DataError(
                f"{table}: line {number} names {name!r}, which matches {len(found)} images ({', '.join(found[:3])}). "
                "Write paths relative to DATA_DIR in the CSV, or set DATA_DIR to the folder of these images."
            )
        if not found:
            missing.append(name)
        elif listed.setdefault(found[0], label) != label:
            raise DataError(f"{table}: {found[0]} has two labels, {listed[found[0]]!r} and {label!r} (line {number}).")
    if not listed:
        raise DataError(
            f"None of the {len(rows)} images that {table.name} names is in the folder (first: {missing[:3]}). "
            "Give DATA_DIR as the folder the CSV's paths are relative to."
        )
    warnings = []
    if missing:
        warnings.append(
            f"{len(missing)} images that {table.name} names are not in the folder, so not used "
            f"(first: {', '.join(missing[:3])})."
        )
    unlabelled = len(images) - len(listed)
    if unlabelled:
        warnings.append(f"{unlabelled} images of the folder are not in {table.name}, so not used.")
    return listed, warnings


def _read(table: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of `table`, separated by the one of `,`, `;` (a spreadsheet saved
    in a locale whose decimal mark is the comma) and tab that its header holds most."""
    try:
        with open(table, "rb") as f:  # a byte-order mark names the encoding (Excel's "Unicode text" is UTF-16)
            encoding = "utf-16" if f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
        with open(table, newline="", encoding=encoding) as f:
            if table.suffix.lower() == ".jsonl":
                header, rows = _json_lines(table, f)
            else:
                first = f.readline()
                f.seek(0)
                reader = csv.DictReader(f, delimiter=max(",;\t", key=first.count))
                header = [name.strip() for name in reader.fieldnames or []]
                reader.fieldnames = header  # Roboflow writes " cat" for column cat
                rows = list(reader)
    except UnicodeDecodeError as err:
        raise DataError(
            f"The labels file {table} is not UTF-8 ({err.reason} at byte {err.start}), as a spreadsheet's "
            "plain 'CSV' export on Windows is not. Save it as 'CSV UTF-8', or convert it: "
            f"`iconv -f cp1252 -t utf-8 {table.name} > labels-utf8.csv`."
        ) from err
    except (OSError, csv.Error) as err:
        raise DataError(f"Cannot read the labels file {table}: {err}.") from err
    if len(header) < 2 or not rows:
        raise DataError(f"{table} needs a header and rows of an image and its label. Received: columns {header}.")
    return header, rows


def _json_lines(table: Path, lines) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of JSON lines, one object per line (the Hugging Face imagefolder's
    `metadata.jsonl`: {"file_name": ..., "label": ...}); values that are not text, numbers or
    booleans are left out."""
    header: dict[str, None] = {}
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{table}: line {number} is not JSON ({err.msg}).") from err
        if not isinstance(item, dict):
            raise DataError(f'{table}: line {number} is not a JSON object, such as {{"file_name": ..., "label": ...}}.')
        row = {str(k): str(v) for k, v in item.items() if isinstance(v, (str, int, float, bool))}
        header.update(dict.fromkeys(row))
        rows.append(row)
    return list(header), [{name: row.get(name, "") for name in header} for row in rows]


def _columns(table: Path, header: list[str], rows: list[dict[str, str]]):
    """The image column, and a function from (line number, row) to its label."""
    lower = [name.lower() for name in header]
    image = next((header[lower.index(c)] for c in IMAGE_COLUMNS if c in lower), header[0])
    others = [name for name in header if name != image]
    if len(others) == 1:
        return image, lambda number, row: _plain(table, number, row[others[0]])
    if all((row[name] or "").strip() in _ONE_HOT for row in rows for name in others):
        return image, lambda number, row: _one_hot(table, number, row, others)
    named = [name for name in others if name.lower() in LABEL_COLUMNS]
    if len(named) == 1:
        return image, lambda number, row: _plain(table, number, row[named[0]])
    raise DataError(
        f"{table}: which column is the label? Expected an image column and one label column "
        f"(named one of {', '.join(LABEL_COLUMNS)}), or one 0/1 column per class. Received: {', '.join(header)}."
    )


def _plain(table: Path, number: int, value: str | None) -> str:
    label = (value or "").strip()
    if not label:
        raise DataError(f"{table}: line {number} has no label.")
    return label


def _one_hot(table: Path, number: int, row: dict[str, str], classes: list[str]) -> str:
    chosen = [name for name in classes if row[name].strip() in ("1", "1.0")]
    if len(chosen) != 1:
        raise DataError(
            f"{table}: line {number} marks {len(chosen)} classes ({', '.join(chosen) or 'none'}); "
            "single-label classification needs exactly one per image."
        )
    return chosen[0]


def _resolver(images: Sequence[str]):
    """A row's image name -> the folder's paths it may mean: the path, or its end after any
    `/` (relative to a split folder, as the Hugging Face imagefolder's `metadata.jsonl` has
    it, or the bare file name), each with or without the extension; one path is a match."""
    exact = set(images)
    index = _index(images, lambda path: (path.rfind("/") + 1,))  # names: what most tables give
    deeper: dict[str, set[str]] | None = None

    def candidates(name: str) -> list[str]:
        nonlocal deeper
        name = name.removeprefix("./")
        if name in exact:
            return [name]
        found = index.get(name)
        if found is None and "/" in name:
            deeper = deeper or _index(images, lambda path: [i + 1 for i, c in enumerate(path) if c == "/"])
            found = deeper.get(name)
        return sorted(found or ())

    return candidates


def _index(images: Sequence[str], starts) -> dict[str, set[str]]:
    """The paths of `images` by their ends at `starts(path)`, with and without the extension."""
    index: dict[str, set[str]] = {}
    for path in images:  # string slicing, not pathlib: a million images are listed on every run
        dot = path.rfind(".")
        stemmed = path[:dot] if dot > path.rfind("/") + 1 else path
        for start in (0, *starts(path)):
            index.setdefault(path[start:], set()).add(path)
            index.setdefault(stemmed[start:], set()).add(path)
    return index
