"""The review server's file access: which files it may read, and their thumbnails.

The server hands out image bytes to anything that can reach its port, so a
request names a file *relative to* one of two roots (the data folder, the audit
folder) and `resolve_under` refuses everything else: '..' segments, absolute
paths, backslashes, and symlinks whose target lies outside the root (checked on
the resolved path, so a symlink farm inside the folder still works). Refusals are
`Forbidden` (403), files that are simply not there `NotFound` (404).

Thumbnails are decoded and downscaled here with Pillow (JPEG's DCT scaling via
`draft`, so a 12-megapixel photo costs a fraction of a full decode) and kept in a
byte-bounded LRU per server: paging back and forth costs nothing the second time.
Cache keys include the file's mtime and size, so an edited image is not served stale.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

#: Thumbnail edges the server renders (a request is rounded up to one): bounds the cache's variety.
SIZES = (96, 160, 256, 512, 1024)


class Forbidden(Exception):
    """A path the server must not serve (outside its roots, or malformed)."""


class NotFound(Exception):
    """A path inside a root that names no readable file."""


class Unreadable(Exception):
    """A file that Pillow cannot decode as an image."""


def resolve_under(root: Path, relative: str) -> Path:
    """The real path of `root/relative`, a regular file inside `root`; Forbidden or NotFound otherwise."""
    if not relative or "\x00" in relative or "\\" in relative:
        raise Forbidden(f"malformed path {relative!r}")
    if relative.startswith("/") or (len(relative) > 1 and relative[1] == ":"):
        raise Forbidden(f"absolute path {relative!r}; expected a path relative to the folder")
    if any(part in ("", ".", "..") for part in relative.split("/")):
        raise Forbidden(f"path {relative!r} has empty, '.' or '..' segments")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([base, real]) != base:
        raise Forbidden(f"{relative!r} resolves outside the folder (a symlink?)")
    if not os.path.isfile(real):
        raise NotFound(f"no file {relative!r} in the folder")
    return Path(real)


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


class Thumbnails:
    """JPEG thumbnails of image files, an LRU bounded by `max_bytes` of encoded JPEG."""

    def __init__(self, max_bytes: int = 64 << 20, quality: int = 85) -> None:
        self.max_bytes = max_bytes
        self.quality = quality
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def edge(requested: int | None) -> int:
        """The rendered edge for a requested one: the next size in SIZES (160 when unset)."""
        if requested is None:
            return 160
        return next((s for s in SIZES if s >= requested), SIZES[-1])

    def get(self, path: Path, requested: int | None = None) -> bytes:
        """JPEG bytes of `path` fitted into a square of `edge(requested)`; Unreadable if not an image."""
        size = self.edge(requested)
        try:
            key = (*_stamp(path), size)
        except OSError as err:
            raise NotFound(f"cannot read {path.name} ({err.strerror})") from None
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        data = self._render(path, size)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._bytes -= len(old)
        return data

    def _render(self, path: Path, size: int) -> bytes:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
                image = ImageOps.exif_transpose(image)
                image = image.convert("RGB")
                image.thumbnail((size, size))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=self.quality)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise Unreadable(f"{path.name} is not an image Pillow can read ({err})") from None
        return out.getvalue()
