"""Labels from file names (LABELS=name, LABELS='name:<regex>'), for folders without class sub-folders.

Kaggle's Dogs vs. Cats (`train/cat.0.jpg`, `train/dog.0.jpg`) and the Oxford-IIIT Pet
dataset (`images/Abyssinian_1.jpg`, `images/american_bulldog_10.jpg`) name each photo's
class in its file name, before a number. `LABELS=name` takes the label from there
(`DEFAULT_PATTERN`); `LABELS='name:<regex>'` takes the first group of a regular
expression searched in the file name (not the folders above it). Images whose name does
not match carry no label: they are counted in a warning and not used, as the images that
a CSV file does not name are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.errors import ConfigError

PREFIX = "name"
#: The label (ending in neither a digit nor a separator, so a bare number such as Kaggle's
#: test1/10.jpg has none), then separators and a number (in brackets, as a file manager's
#: copies have it), perhaps a copy's "(1)", then the extension: cat.0.jpg,
#: Abyssinian_100.jpg, dog (2).png, pug_3 (1).jpg.
DEFAULT_PATTERN = r"^(.*?[^\d ._-])[ ._-]*\(?\d+\)?(?: ?\(\d+\))?\.\w+$"


def name_pattern(labels: str) -> re.Pattern[str] | None:
    """The file-name pattern that LABELS asks for, or None when LABELS names a CSV file."""
    if labels == PREFIX:
        return re.compile(DEFAULT_PATTERN)
    if not labels.startswith(PREFIX + ":"):
        return None
    try:
        pattern = re.compile(labels[len(PREFIX) + 1 :])
    except re.error as err:
        raise ConfigError(f"LABELS={labels!r} holds no valid regular expression: {err}.") from err
    if pattern.groups < 1:
        raise ConfigError(
            f"LABELS={labels!r} needs a group around the label in the file name, "
            r"such as LABELS='name:^([a-z]+)\.' for cat.0.jpg."
        )
    return pattern


def labelled_by_name(pattern: re.Pattern[str], labels: str, images: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({image path: label}, warnings) for `images` (paths relative to the folder)."""
    listed: dict[str, str] = {}
    unmatched = []
    for path in images:
        match = pattern.search(path[path.rfind("/") + 1 :])
        label = (match.group(1) or "").strip() if match else ""
        if label:
            listed[path] = label
        else:
            unmatched.append(path)
    warnings = []
    if unmatched:
        warnings.append(
            f"{len(unmatched)} {'image has' if len(unmatched) == 1 else 'images have'} no label in the file "
            f"name (LABELS={labels}), so {'is' if len(unmatched) == 1 else 'are'} not used "
            f"(first: {', '.join(unmatched[:3])})."
        )
    return listed, warnings


def looks_labelled(names: Sequence[str]) -> str | None:
    """An example (`cat.0.jpg: cat`) when most `names` carry one of several labels by
    `DEFAULT_PATTERN`, for errors to suggest LABELS=name; else None."""
    pattern = re.compile(DEFAULT_PATTERN)
    found = {name: match.group(1) for name in names if (match := pattern.search(name))}
    if len(found) < 0.9 * len(names) or len(set(found.values())) < 2:
        return None
    name = min(found)
    return f"{name}: {found[name]}"
