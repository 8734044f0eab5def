"""Content digests of image files: sha256 of the bytes, cached by (path, size, mtime_ns).

Decisions (`pipeline.decisions`) are keyed by what an image is, not where it is, so
every run that applies them needs each row's sha256. Hashing a whole data folder on
every `make head` would cost more than training the head; like git's index, the cache
keeps (path, size, mtime_ns) -> digest and re-reads only files that changed. It is
one small CSV beside the decisions file, rewritten atomically, so a lost cache only
costs time. This module is the one place rows get their digest: when the feature
store records each row's sha256, `row_digests` can read it from there instead.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_COLUMNS = ("path", "size", "mtime_ns", "sha256")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of files, remembered across processes in `path` (None: in memory only).

    Safe to share between threads (the review server's request threads).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._known: dict[tuple[str, int, int], str] = {}
        self._dirty = False
        self._lock = threading.Lock()
        if self.path is not None:
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    self._known[(row["path"], int(row["size"]), int(row["mtime_ns"]))] = row["sha256"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("digest cache %s is unreadable (%s); hashing the files again.", self.path, err)
            self._known.clear()

    def of(self, path: Path) -> str | None:
        """The file's sha256, or None when it cannot be read (moved or deleted since extraction)."""
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            return None
        key = (real, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        try:
            digest = file_sha256(Path(real))
        except OSError:
            return None
        with self._lock:
            self._known[key] = digest
            self._dirty = True
        return digest

    def save(self) -> None:
        """Writes the cache (temporary file, then rename) when it learnt something."""
        with self._lock:
            if self.path is None or not self._dirty:
                return
            known = sorted(self._known.items())
            self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CACHE_COLUMNS)
            for (p, size, mtime), digest in known:
                writer.writerow([p, size, mtime, digest])
        os.replace(tmp, self.path)


def row_digests(root: Path, ids: Sequence[str], cache: DigestCache) -> list[str | None]:
    """sha256 of each row's file `root/id` (None where unreadable, logged once with the count)."""
    digests = [cache.of(Path(root) / str(i)) for i in ids]
    missing = [str(i) for i, d in zip(ids, digests) if d is None]
    if missing:
        log.warning(
            "%d of %d files under %s cannot be read (moved since extraction?); no decision reaches them: %s",
            len(missing),
            len(ids),
            root,
            ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""),
        )
    cache.save()
    return digests
