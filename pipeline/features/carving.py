"""Carving the splits a folder lacks out of another split: stratified, seeded, and stable as the folder grows.

Within each class, entries are ranked by a seeded hash of their path (`seeded_rank`) and
the first ones by rank are carved, by exact quotas (`quotas`): with fractions f1, f2, ...
of a class of n images, the first round(n * f1) go to the first carved split, the images
up to round(n * (f1 + f2)) to the second, and so on, rounded half up; the rest stay.
Each carved split gets at least one image of every class that keeps one for the rest,
so a small class is still represented where it is evaluated.

Why ranks and quotas: an image's rank does not depend on the other images, so adding
k images to a class shifts each boundary between splits by at most k of the earlier
images of that class (a boundary grows by at most k, and at most k new images rank
ahead). With one carved split at most k earlier images change split; with two
(validation and test) at most k cross each boundary, so at most 2k change split.
Exactly k cannot be promised there: a class of 14 at 10% + 10% has 1 test and 2
validation images, of 15 it has 2 and 1, so a new image ranked into validation forces
two earlier ones out of it.

Why paths, not content: the carve is a function of the listing alone, so every reader
of the folder (stage 1's scan, fine-tuning, the workers of a cluster, `make choose`)
gets the same splits without reading a byte or finding a stat cache. A renamed file is
ranked anew (its features are still reused: the store is keyed by content), and two
copies of the same bytes can land in different splits: `make audit` reports such leaks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

from pipeline.errors import DataError

Entry = TypeVar("Entry", bound=tuple)


def seeded_rank(seed: int, value: object) -> bytes:
    """A seeded 8-byte hash of `value`: sorting by it is a seeded shuffle in which a value keeps its rank."""
    return hashlib.blake2b(f"{seed}:{value}".encode(), digest_size=8).digest()


def seeded_ranks(seed: int, values: Sequence[str]) -> list[bytes]:
    """`seeded_rank` of each of `values`, the seed hashed once (a no-op scan ranks every path)."""
    seeded = hashlib.blake2b(f"{seed}:".encode(), digest_size=8)
    ranks = []
    for value in values:
        each = seeded.copy()
        each.update(value.encode())
        ranks.append(each.digest())
    return ranks


def quotas(n: int, fractions: Sequence[float]) -> list[int]:
    """The cumulative boundaries [round(n * f1), round(n * (f1 + f2)), ...] of a class of `n`, rounded half up.

    A split of a positive fraction ends at least one image after the one before while
    the class keeps one image for the rest. Each boundary grows by at most one per image
    added (built of minima and maxima of such functions), which is the carve's stability.
    """
    bounds, total, bound = [], 0.0, 0
    for fraction in fractions:
        total += fraction
        if fraction > 0:
            half_up = math.floor(round(n * total, 9) + 0.5)  # 0.7 * 5 is 3.4999999999999996 in floats
            bound = min(n, max(min(bound + 1, n - 1), half_up))
        bounds.append(bound)
    return bounds


def carve(
    entries: Sequence[Entry], fractions: Sequence[float], seed: int, *, names: Sequence[str], class_names: Sequence[str]
) -> list[list[Entry]]:
    """Splits [(path, label, ...)] into one list per fraction, then the rest, each in the order of `entries`.

    `names` names the carved splits then the rest, for errors: a class left without
    images in the rest, or a carved split left empty, cannot be carved.
    """
    by_class: dict[int, list[int]] = {}
    for i, entry in enumerate(entries):
        by_class.setdefault(entry[1], []).append(i)
    ranks = seeded_ranks(seed, [entry[0] for entry in entries])
    part = [len(fractions)] * len(entries)
    carved = [0] * len(fractions)
    for label, members in by_class.items():
        bounds = quotas(len(members), fractions)
        if any(fractions) and bounds[-1] >= len(members):
            _too_small(class_names[label], len(members), fractions, names)
        ranked = sorted(members, key=ranks.__getitem__)
        start = 0
        for k, stop in enumerate(bounds):
            for i in ranked[start:stop]:
                part[i] = k
            carved[k] += stop - start
            start = stop
    empty = [k for k, f in enumerate(fractions) if f > 0 and not carved[k] and entries]
    if empty:
        sizes = sorted(len(m) for m in by_class.values())
        k = empty[0]
        raise DataError(
            f"Cannot carve a {fractions[k]:.0%} {names[k]} split from classes of {sizes[0]}-{sizes[-1]} images: "
            f"rounded, it holds no image of any class. Use a larger fraction or more images."
        )
    out: list[list[Entry]] = [[] for _ in range(len(fractions) + 1)]
    for entry, k in zip(entries, part):
        out[k].append(entry)
    return out


def _too_small(class_name: str, n: int, fractions: Sequence[float], names: Sequence[str]) -> None:
    asked = " + ".join(f"{f:.0%} {name}" for f, name in zip(fractions, names) if f)
    raise DataError(
        f"Cannot carve {asked} from class '{class_name}' ({n} image{'s' * (n != 1)}): it would leave no image "
        f"in {names[-1]}. "
        "Use smaller fractions or more images."
    )
