"""Which files of a folder are images: the walk every stage shares.

Stage 1's scan, `make predict` and the benchmarks list a folder here, so a file left
out (hidden, archive debris, a format TensorFlow cannot decode, a name that is not
UTF-8) is left out everywhere, and counted in a warning where people would want to
know.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp"})
#: Photo formats people have that stage 1's decoder cannot read (iPhones save HEIC): left
#: out with a warning that counts them and says how to include them, not only logged.
UNDECODED_PHOTO_FORMATS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".tif", ".tiff", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf"}
    | {".pgm", ".ppm", ".pbm", ".pnm", ".dcm", ".dicom"}  # older vision datasets (faces in PGM); medical scans
)


#: Folders that archivers, NAS boxes and operating systems add beside the data: macOS zips
#: (`__MACOSX`, AppleDouble `._*` copies of every file), Synology's thumbnails (`@eaDir`,
#: real JPEGs that would pass for photos of the class), Windows' recycle bin and volume data.
NOT_DATA_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


def not_data(name: str) -> bool:
    """Whether a file or folder name is never data: hidden (`.DS_Store`, `._x.jpg`, `.git`) or
    one of `NOT_DATA_FOLDERS`. Such entries are left out and logged, never classes or images."""
    return name.startswith(".") or name in NOT_DATA_FOLDERS


def list_images(directory: Path, root: Path, ignored: list[str]) -> list[str]:
    """The images under `directory`, as paths relative to `root`, links to folders followed
    (a dataset assembled from links is common); a link to a folder already listed, such as
    one back to its parent, is left out and logged rather than listed again (or forever)."""
    # Plain strings per file, pathlib per folder: every no-op `make features` lists the tree.
    images = []
    listed: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        prefix = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        real = os.path.realpath(dirpath)
        if real in listed:
            ignored.append(f"{prefix.rstrip('/') or '.'} (a link to a folder listed already)")
            dirnames[:] = []
            continue
        listed.add(real)
        ignored += [prefix + d for d in dirnames if d in NOT_DATA_FOLDERS]
        dirnames[:] = sorted(d for d in dirnames if not not_data(d))
        for name in sorted(filenames):
            relative = prefix + name
            dot = name.rfind(".")
            if not_data(name) or dot < 0 or name[dot:].lower() not in IMAGE_EXTENSIONS:
                ignored.append(relative)
            elif not (relative.isascii() or is_utf8(relative)):
                ignored.append(relative + NOT_UTF8)
            else:
                images.append(relative)
    return images


def image_files(directory: Path) -> list[Path]:
    """The images under `directory`, sorted, found as stage 1 finds a class's images."""
    ignored: list[str] = []
    images = [directory / relative for relative in list_images(directory, directory, ignored)]
    for warning in non_utf8_names(ignored, directory):
        log.warning(warning)
    return images


#: Marks a listed path whose name is not UTF-8 (a zip made on Windows): the feature file
#: stores ids as UTF-8, so such an image is left out with a warning, never a traceback.
NOT_UTF8 = " (name not UTF-8)"


def is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return False
    return True


def non_utf8_names(ignored: Sequence[str], root: Path) -> list[str]:
    """A warning counting the images left out for a name that is not UTF-8, if any."""
    bad = [path.removesuffix(NOT_UTF8) for path in ignored if path.endswith(NOT_UTF8)]
    if not bad:
        return []
    return [
        f"{len(bad)} {'image is' if len(bad) == 1 else 'images are'} left out: their names are not UTF-8 "
        f"(first: {os.fsencode(bad[0])!r}), as in a zip made on Windows. To include them, rename them: "
        f"`convmv -f cp1252 -t utf8 -r --notest {root}` (cp1252: the encoding they were made with)."
    ]


def undecoded_photos(ignored: Sequence[str]) -> list[str]:
    """A warning counting the photos left out for their format (`UNDECODED_PHOTO_FORMATS`), if any."""
    formats = Counter(Path(path).suffix.lower() for path in ignored)
    found = {ext: n for ext, n in sorted(formats.items()) if ext in UNDECODED_PHOTO_FORMATS}
    if not found:
        return []
    count = sum(found.values())
    return [
        f"{count} {'photo is' if count == 1 else 'photos are'} left out: TensorFlow cannot decode "
        f"{', '.join(f'{ext[1:].upper()} ({n})' for ext, n in found.items())}. Convert them to JPEG or PNG "
        "to include them (for HEIC: `heif-convert`, or `magick mogrify -format png *.heic`; DICOM: `dcm2pnm`)."
    ]
