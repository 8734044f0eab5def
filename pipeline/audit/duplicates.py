"""Duplicates: byte-identical files, near-duplicate pairs and the clusters they form."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.graph import unit_block
from pipeline.audit.neighbours import Neighbours
from pipeline.audit.rows import SPLIT_ORDER, Rows

log = logging.getLogger(__name__)


def file_digests(root: Path, ids: Sequence[str]) -> list[str | None]:
    """sha256 of each file `root/id`; None (logged) for a file that cannot be read."""
    digests: list[str | None] = []
    missing = []
    for i in ids:
        try:
            digests.append(hashlib.sha256((root / i).read_bytes()).hexdigest())
        except OSError:
            digests.append(None)
            missing.append(i)
    if missing:
        log.warning(
            "audit: %d files under %s cannot be read (moved since extraction?), no byte check for them: %s",
            len(missing),
            root,
            ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
        )
    return digests


def byte_identical_pairs(digests: Sequence[str | None]) -> np.ndarray:
    """(P, 2) int64 row pairs i < j with the same file digest."""
    groups: dict[str, list[int]] = {}
    for row, digest in enumerate(digests):
        if digest is not None:
            groups.setdefault(digest, []).append(row)
    pairs = [(a, b) for members in groups.values() for x, a in enumerate(members) for b in members[x + 1 :]]
    return np.array(pairs, np.int64).reshape(-1, 2)


def clusters_of(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find) of the rows in `pairs`, each sorted; sizes >= 2."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for row in sorted({r for p in pairs.tolist() for r in p}):
        groups.setdefault(find(row), []).append(row)
    return sorted(groups.values(), key=lambda g: g[0])


def duplicate_findings(
    rows: Rows,
    near: Neighbours,
    exact: np.ndarray,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One finding per pair (leaks first, then by similarity) and the clusters they form.

    EXCLUDE keeps one copy of a cluster inside train (the first by split order and
    id) and drops every train copy of a cluster that reaches validation or test: the
    leak is then gone from training; the validation/test copies stay, and are logged.
    """
    exact_set = {tuple(p) for p in exact.tolist()}
    similarity = {tuple(p): float(s) for p, s in zip(near.pairs.tolist(), near.similarity.tolist())}
    for p in exact_set - set(similarity):
        ends = unit_block(rows.features[list(p)])
        similarity[p] = float(ends[0] @ ends[1])
    pairs = sorted(similarity)
    groups = clusters_of(len(rows), np.array(pairs, np.int64).reshape(-1, 2))
    cluster_of = {r: c for c, members in enumerate(groups) for r in members}
    split_rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    clusters = []
    for c, members in enumerate(groups):
        members = sorted(members, key=lambda r: (split_rank.get(rows.splits[r], 9), rows.ids[r]))
        splits = [str(rows.splits[r]) for r in members]
        train = [r for r in members if rows.splits[r] == "train"]
        leak = len(set(splits)) > 1
        drop = train if (leak and len(train) < len(members)) else train[1:]
        clusters.append(
            {
                "cluster": c,
                "rows": members,
                "splits": splits,
                "cross_split": leak,
                "exclude": [str(rows.ids[r]) for r in drop],
            }
        )
    findings = []
    for i, j in pairs:
        findings.append(
            {
                "kind": "duplicates",
                "match": "exact" if (i, j) in exact_set else "near",
                "rows": [i, j],
                "score": round(similarity[(i, j)], 5),
                "cross_split": bool(rows.splits[i] != rows.splits[j]),
                "cluster": cluster_of[i],
            }
        )
    findings.sort(key=lambda f: (not f["cross_split"], f["match"] != "exact", -f["score"], f["rows"]))
    return findings, clusters
