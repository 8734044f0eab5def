"""`make audit`: the orchestration that runs every check on a feature file and writes the audit.

Hand-labelled photo sets hold mistakes: the same photo twice (sometimes once in train
and once in test, which inflates the test score), photos in the wrong class folder,
things that belong to no class. The stage-1 features make finding them nearly free:

1. duplicates (`audit.duplicates`): byte-identical files (sha256 of the bytes, folder
   sources) and near-duplicates, row pairs whose L2-normalised features have cosine
   similarity >= `duplicate_threshold` (calibrated on planted copies, see README),
   read off the neighbour graph (`audit.graph`, persisted by `audit.graphstore`).
   Pairs across splits (leaks) come first; pairs are grouped into clusters (union-find).
2. label errors (`audit.labels`): confident learning (Northcutt, Jiang & Chuang,
   "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70, 2021) on
   the mean of out-of-fold probabilities of the stage-2 logistic head (stratified
   k-fold over train + validation, one C for every fold; on the graph's PCA at scale)
   and the kNN label vote of the graph, every issue scored and ranked.
3. outliers (`audit.outliers`): mean cosine distance to the k nearest neighbours (the
   same graph), flagged from a robust z-score (Iglewicz & Hoaglin's modified z > 3.5).
4. class overlap: the class pairs the probe confuses most, from the out-of-fold
   confusion matrix.

Output: `<audit_dir>/<feature file stem>/` with `audit.json` (`audit.record`),
`audit.md` (`audit.report`) and one contact sheet per finding kind (`audit.sheets`),
assembled in a temporary folder and renamed into place. `audit.exclusion` reads an
audit.json back for `make head EXCLUDE=...`, which leaves the flagged train rows out.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.duplicates import byte_identical_pairs, duplicate_findings, file_digests
from pipeline.audit.graphstore import graph_dir, graph_record, identity, neighbour_graph, probe_rows, settings_of
from pipeline.audit.labels import class_overlap, label_findings
from pipeline.audit.neighbours import pairs_above
from pipeline.audit.outliers import outlier_findings
from pipeline.audit.record import FORMAT_VERSION, excluded_ids, write_record
from pipeline.audit.report import report
from pipeline.audit.rows import Rows, check_rows, describe, folder_root, load_rows
from pipeline.audit.sheets import contact_sheets
from pipeline.config import AuditConfig
from pipeline.features.store import FeatureSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditResult:
    """A finished audit: its folder, the counts of every finding kind and the timings."""

    out_dir: Path
    counts: dict[str, Any]
    seconds: dict[str, float]

    def summary(self) -> str:
        c = self.counts
        overlap = c.get("most_confused")
        confused = (
            f"most confused: {overlap['classes'][0]} <-> {overlap['classes'][1]} {overlap['count']} "
            f"({overlap['rate']:.1%})"
            if overlap
            else "no classes confused"
        )
        return (
            f"audit: {c['rows']} rows; duplicates: {c['duplicate_pairs']} pairs in {c['duplicate_clusters']} "
            f"clusters ({c['cross_split_pairs']} across splits, {c['byte_identical_pairs']} byte-identical); "
            f"label issues: {c['label_issues']} ({c['label_issues_train']} in train); outliers: {c['outliers']}; "
            f"{confused} -> {self.out_dir}"
        )


def audit_dir_for(features_path: Path, config: AuditConfig) -> Path:
    return Path(config.audit_dir) / Path(features_path).stem


def audit_features(features_path: Path, config: AuditConfig, *, expect: Mapping[str, Any] | None = None) -> AuditResult:
    """Runs every check on a feature file and writes `<audit_dir>/<stem>/`; see the module docstring."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    cached, rows = load_rows(features_path, expect=expect, block=config.block_rows)
    class_names = list(cached.class_names)
    check_rows(cached, rows)
    timings["read"] = time.perf_counter() - started

    step = time.perf_counter()
    settings = settings_of(config)
    wanted = identity(cached.key, rows.ids, rows.features.shape[1], settings)
    folder = graph_dir(config.audit_dir, features_path)
    graph, built = neighbour_graph(folder, rows.features, wanted, settings)
    near = pairs_above(graph, config.duplicate_threshold)
    timings["neighbour_graph"] = time.perf_counter() - step

    step = time.perf_counter()
    root = folder_root(cached)
    duplicates, clusters = duplicate_findings(rows, near, _exact_pairs(cached, rows, root))
    timings["duplicates"] = time.perf_counter() - step

    step = time.perf_counter()
    probe_x, reduced = probe_rows(rows.features, graph, folder, settings)
    probe, labels = label_findings(rows, class_names, config, probe_x, near, reduced=reduced)
    del probe_x
    timings["label_errors"] = time.perf_counter() - step

    step = time.perf_counter()
    outliers, scores = outlier_findings(rows, near, class_names, config)
    timings["outliers"] = time.perf_counter() - step

    overlap = class_overlap(np.array(probe["confusion_matrix"]), class_names)
    findings = duplicates + labels + outliers + [{"kind": "overlap", **o} for o in overlap]
    _name_rows(findings, clusters, rows, root, class_names)
    counts = _counts(rows, findings, clusters, overlap)
    record = {
        "format_version": FORMAT_VERSION,
        "features": str(features_path),
        "features_key": cached.key,
        "class_names": class_names,
        "config": config.to_dict(),
        "counts": counts,
        "graph": graph_record(graph, folder, built=built, saturated=near.saturated),
        "probe": probe,
        "outlier_scores": scores,
        "clusters": clusters,
        "findings": findings,
    }
    out_dir = audit_dir_for(features_path, config)
    step = time.perf_counter()
    _write_audit(out_dir, record, cached, rows, config)
    timings["write"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    seconds = {k: round(v, 3) for k, v in timings.items()}
    return AuditResult(out_dir=out_dir, counts=counts, seconds=seconds)


def _exact_pairs(cached: FeatureSet, rows: Rows, root: Path | None) -> np.ndarray:
    """Row pairs of byte-identical files; none without an image folder to read."""
    if root is not None:
        return byte_identical_pairs(file_digests(root, rows.ids))
    log.info(
        "audit: %s names no image folder (a tfds dataset?): no byte check; exact copies show as "
        "near-duplicates at cosine 1.0.",
        cached.path,
    )
    return np.zeros((0, 2), np.int64)


def _counts(
    rows: Rows, findings: Sequence[Mapping[str, Any]], clusters: Sequence[Mapping[str, Any]], overlap: list[dict]
) -> dict[str, Any]:
    """The number of findings of every kind, and of train rows EXCLUDE would drop per kind."""
    duplicates = [f for f in findings if f["kind"] == "duplicates"]
    labels = [f for f in findings if f["kind"] == "label"]
    return {
        "rows": len(rows),
        "rows_per_split": {s: int((rows.splits == s).sum()) for s in dict.fromkeys(rows.splits.tolist())},
        "duplicate_pairs": len(duplicates),
        "duplicate_clusters": len(clusters),
        "cross_split_pairs": sum(f["cross_split"] for f in duplicates),
        "byte_identical_pairs": sum(f["match"] == "exact" for f in duplicates),
        "label_issues": len(labels),
        "label_issues_train": sum(f["splits"][0] == "train" for f in labels),
        "outliers": sum(f["kind"] == "outlier" for f in findings),
        "overlapping_class_pairs": len(overlap),
        "most_confused": overlap[0] if overlap else None,
        "exclude": {kind: len(ids) for kind, ids in excluded_ids(findings, clusters).items()},
    }


def _name_rows(
    findings: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    rows: Rows,
    root: Path | None,
    class_names: Sequence[str],
) -> None:
    """Replaces row numbers by ids, paths, splits and labels; label and outlier
    findings in train get the id EXCLUDE would drop."""
    for finding in findings:
        members = finding.pop("rows", None)
        if members is None:
            continue
        finding.update(describe(rows, members, root, class_names))
        if finding["kind"] in ("label", "outlier"):
            finding["exclude"] = [i for i, s in zip(finding["ids"], finding["splits"]) if s == "train"]
    for cluster in clusters:
        cluster.update(describe(rows, cluster.pop("rows"), root, class_names))


def _write_audit(out_dir: Path, record: dict[str, Any], cached: FeatureSet, rows: Rows, config: AuditConfig) -> None:
    """Writes audit.json, audit.md and the contact sheets into a temporary folder, then renames it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_record(work, record)
        sheets = contact_sheets(work, record, cached, rows, config)
        (work / "audit.md").write_text(report(record, sheets))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
