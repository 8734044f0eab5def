"""Contact sheets: the top findings of each kind as thumbnails, read back from the images.

Folder images are read with PIL; TensorFlow is imported only for tfds images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.rows import Rows, folder_root
from pipeline.config import AuditConfig
from pipeline.features.store import FeatureSet

log = logging.getLogger(__name__)

_THUMBNAIL = 160

SHEETS = {"duplicates": "duplicates.png", "label": "label_issues.png", "outlier": "outliers.png"}


def contact_sheets(
    work: Path, record: Mapping[str, Any], cached: FeatureSet, rows: Rows, config: AuditConfig
) -> list[str]:
    """One PNG per finding kind: the top findings as thumbnails with labels and scores."""
    from pipeline import plots

    if config.top == 0:
        return []
    chosen = {kind: [f for f in record["findings"] if f["kind"] == kind][: config.top] for kind in SHEETS}
    wanted = {(s, i) for fs in chosen.values() for f in fs for s, i in zip(f["splits"], f["ids"])}
    images = read_thumbnails(cached, rows, wanted)
    names = []
    for kind, findings in chosen.items():
        groups, captions, colors = [], [], []
        for f in findings:
            groups.append([images.get((s, i)) for s, i in zip(f["splits"], f["ids"])])
            captions.append(_caption(f))
            colors.append("red" if f.get("cross_split") else "black")
        title = {
            "duplicates": f"Duplicates: top {len(findings)} of {record['counts']['duplicate_pairs']} pairs "
            "(leaks across splits first, in red)",
            "label": f"Label issues: top {len(findings)} of {record['counts']['label_issues']} (given -> suggested)",
            "outlier": f"Outliers: top {len(findings)} of {record['counts']['outliers']} (kNN distance)",
        }[kind]
        plots.contact_sheet(groups, captions, work / SHEETS[kind], title=title, colors=colors)
        names.append(SHEETS[kind])
    return names


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _caption(f: Mapping[str, Any]) -> str:
    if f["kind"] == "duplicates":
        ends = "\n".join(f"{s}: {_short(i, 34)}" for s, i in zip(f["splits"], f["ids"]))
        return f"{f['match']}, cosine {f['score']:.3f}, {' / '.join(f['labels'])}\n{ends}"
    if f["kind"] == "label":
        return (
            f"#{f['rank']} given {f['given']} -> {f['suggested']}\n"
            f"score {f['score']:.3f}, p(given) {f['self_confidence']:.2f}\n{f['splits'][0]}: {_short(f['ids'][0])}"
        )
    return (
        f"#{f['rank']} distance {f['score']:.3f} (z {f['z']:.1f})\n"
        f"{f['labels'][0]}, {f['splits'][0]}\n{_short(f['ids'][0])}"
    )


def read_thumbnails(cached: FeatureSet, rows: Rows, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """(split, id) -> uint8 RGB thumbnail; images that cannot be read are left out (logged).

    Folder images are read with PIL from DATA_DIR (cheap, no TensorFlow); tfds images
    with the stage-2 reader, decoded as the backbone saw them.
    """
    root = folder_root(cached)
    out: dict[tuple[str, str], np.ndarray] = {}
    failed = []
    if root is not None:
        from pipeline.images import read_image_file

        for split, i in sorted(wanted):
            try:
                out[(split, i)] = read_image_file(root / i, _THUMBNAIL)
            except (OSError, ValueError):
                failed.append(i)
    elif cached.key.get("source") == "tfds":
        from pipeline.config import FeaturesConfig
        from pipeline.features.pictures import load_images

        position = {(str(s), str(i)): int(p) for s, i, p in zip(rows.splits, rows.ids, rows.index)}
        for split in sorted({s for s, _ in wanted}):
            mine = sorted(i for s, i in wanted if s == split)
            try:
                images = load_images(
                    FeaturesConfig.from_dict(cached.config), split, np.array([position[(split, i)] for i in mine])
                )
            except Exception as err:  # the sheets are optional; audit.json is not
                log.warning("audit: cannot read the %s images back for the contact sheets (%s).", split, err)
                continue
            for i in mine:
                image = images.get(position[(split, i)])
                if image is None:
                    failed.append(i)
                else:
                    out[(split, i)] = np.clip(image, 0, 255).astype(np.uint8)
    else:
        log.info("audit: %s names no image folder or tfds dataset; contact sheets without images.", cached.path)
    if failed:
        log.warning(
            "audit: %d images cannot be read back for the contact sheets (moved since extraction?): %s",
            len(failed),
            ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else ""),
        )
    return out
