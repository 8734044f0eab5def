"""audit.json as the review page's sections: the items a person decides on, in order.

Four sections, each a list of items with one or more members (images):

- `label`: label issues, worst first (the audit's rank: lowest normalized margin);
  one member, with the given and suggested label and the probe's confidence.
- `duplicates`: duplicate clusters inside one split, strongest first; all members
  side by side (a cluster, not a pair: three copies are one decision, not three).
- `leaks`: clusters that reach across splits (train and test copies), first in
  importance, since they inflate the test score.
- `outliers`: farthest first, with the nearest other image as context.

Members carry `id` (path relative to the data folder, as the audit names rows),
`split`, the given `label`, and whether `make head EXCLUDE=` would drop them
(`audit_excludes`), so the page can show what the automatic rule would do.
The sections are built once per server from audit.json; paging slices them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.audit.record import AUDIT_FILE, read_record
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "validation", "test")
SECTIONS = {
    "label": "Label issues",
    "duplicates": "Duplicates",
    "leaks": "Cross-split leaks",
    "outliers": "Outliers",
}


@dataclass(frozen=True)
class Audit:
    """A read audit: its folder, the data folder its ids are relative to (None: tfds), and its sections."""

    folder: Path
    record: Mapping[str, Any]
    data_dir: Path | None
    sections: dict[str, list[dict[str, Any]]]

    @property
    def class_names(self) -> list[str]:
        return list(self.record["class_names"])

    def summary(self) -> dict[str, Any]:
        return {
            "audit": str(self.folder),
            "features": self.record.get("features"),
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "class_names": self.class_names,
            "counts": self.record.get("counts", {}),
            "sections": [{"name": n, "title": t, "total": len(self.sections[n])} for n, t in SECTIONS.items()],
        }


def find_audit(folder: Path) -> Path:
    """The audit folder to serve: `folder` itself when it holds audit.json, else its latest audit (by mtime)."""
    folder = Path(os.path.abspath(folder))
    if folder.name == AUDIT_FILE:
        return folder.parent
    if (folder / AUDIT_FILE).is_file():
        return folder
    found = sorted(folder.glob(f"*/{AUDIT_FILE}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise ConfigError(
            f"Expected an audit of `make audit` in AUDIT_DIR={str(folder)!r} (an audit folder, or a folder of them); "
            "found none. Run `make audit` first, or set AUDIT_DIR to its output folder."
        )
    return found[-1].parent


def read_audit(folder: Path, data_dir: Path | None = None) -> Audit:
    """Reads `folder/audit.json` into sections.

    `data_dir` overrides the data folder recorded in the audit (the images moved);
    without it the folder is recovered from the audit's absolute paths.
    """
    path = Path(os.path.abspath(folder)) / AUDIT_FILE
    record = read_record(path)
    root = Path(data_dir) if data_dir is not None else _data_root(record, path)
    if root is not None and not root.is_dir():
        raise ConfigError(
            f"The audit's images were under {root}, which is not a folder now. "
            "Move them back, or rerun `make audit` on their new place."
        )
    return Audit(folder=path.parent, record=record, data_dir=root, sections=build_sections(record))


def _data_root(record: Mapping[str, Any], path: Path) -> Path | None:
    """The folder the audit's ids are relative to: each absolute path is root/id."""
    roots = set()
    for entry in [*record.get("findings", []), *record.get("clusters", [])]:
        for i, p in zip(entry.get("ids", ()), entry.get("paths", ()) or ()):
            if p and p.endswith("/" + i):
                roots.add(p[: -len(i) - 1])
    if len(roots) > 1:
        raise ConfigError(
            f"{path} names images under several folders ({', '.join(sorted(roots)[:3])}); "
            "pass the data folder: --data-dir DIR."
        )
    if not roots:
        log.info("review: %s names no image files (a tfds dataset?): no thumbnails, no decisions.", path)
        return None
    return Path(roots.pop())


def _members(entry: Mapping[str, Any], excludes: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"id": i, "split": s, "label": lab, "audit_excludes": i in excludes}
        for i, s, lab in zip(entry["ids"], entry["splits"], entry["labels"])
    ]


def build_sections(record: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """section -> items in review order (see the module docstring)."""
    findings = record["findings"]
    labels = [
        {
            "key": f"label:{f['rank']}",
            "kind": "label",
            "rank": f["rank"],
            "score": f["score"],
            "given": f["given"],
            "suggested": f["suggested"],
            "self_confidence": f["self_confidence"],
            "suggested_probability": f.get("suggested_probability"),
            "members": _members(f, f.get("exclude", [])),
        }
        for f in findings
        if f["kind"] == "label"
    ]
    outliers = [
        {
            "key": f"outlier:{f['rank']}",
            "kind": "outlier",
            "rank": f["rank"],
            "score": f["score"],
            "z": f["z"],
            "centroid_distance": f.get("centroid_distance"),
            "members": _members(f, f.get("exclude", [])),
            "context": [{"id": f["nearest"], "role": "nearest"}] if f.get("nearest") else [],
        }
        for f in findings
        if f["kind"] == "outlier"
    ]
    pairs: dict[int, list[Mapping[str, Any]]] = {}
    for f in findings:  # the audit sorts pairs: leaks first, exact first, then by similarity
        if f["kind"] == "duplicates":
            pairs.setdefault(f["cluster"], []).append(f)
    clusters = {c["cluster"]: c for c in record.get("clusters", [])}
    groups: dict[str, list[dict[str, Any]]] = {"duplicates": [], "leaks": []}
    for n, mine in pairs.items():  # dicts keep insertion order: the clusters in the order of their best pair
        cluster = clusters.get(n)
        if cluster is None:
            continue
        groups["leaks" if cluster["cross_split"] else "duplicates"].append(
            {
                "key": f"cluster:{n}",
                "kind": "leak" if cluster["cross_split"] else "duplicate",
                "cluster": n,
                "score": max(p["score"] for p in mine),
                "pairs": len(mine),
                "match": "exact" if any(p["match"] == "exact" for p in mine) else "near",
                "splits": sorted(
                    set(cluster["splits"]), key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s)
                ),
                "members": _members(cluster, cluster.get("exclude", [])),
            }
        )
    for items in groups.values():
        for i, item in enumerate(items, start=1):
            item["rank"] = i
    return {"label": labels, "duplicates": groups["duplicates"], "leaks": groups["leaks"], "outliers": outliers}
