"""audit.md: the audit's findings as markdown tables beside its contact sheets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: (kind, heading, table header, one table row of a finding) of each section of audit.md.
_SECTIONS = [
    (
        "duplicates",
        "Duplicates (leaks across splits first)",
        "| match | cosine | splits | ids | labels |",
        lambda f: (
            f"| {f['match']} | {f['score']:.4f} | {' / '.join(f['splits'])} | {' / '.join(f['ids'])} "
            f"| {' / '.join(f['labels'])} |"
        ),
    ),
    (
        "label",
        "Label issues (most likely first)",
        "| # | id | split | given | suggested | p(given) | score (margin, low first) |",
        lambda f: (
            f"| {f['rank']} | {f['ids'][0]} | {f['splits'][0]} | {f['given']} | {f['suggested']} "
            f"| {f['self_confidence']:.3f} | {f['score']:.3f} |"
        ),
    ),
    (
        "outlier",
        "Outliers (farthest first)",
        "| # | id | split | label | kNN distance | z | centroid distance |",
        lambda f: (
            f"| {f['rank']} | {f['ids'][0]} | {f['splits'][0]} | {f['labels'][0]} | {f['score']:.4f} "
            f"| {f['z']:.1f} | {f['centroid_distance']:.4f} |"
        ),
    ),
    (
        "overlap",
        "Class overlap (out-of-fold confusions, both ways)",
        "| classes | count | rate |",
        lambda f: f"| {f['classes'][0]} <-> {f['classes'][1]} | {f['count']} | {f['rate']:.2%} |",
    ),
]


def _graph_lines(graph: Mapping[str, Any] | None) -> list[str]:
    """The neighbour graph behind every check: its index and its recall@k against exact search."""
    if not graph:
        return []
    recall = graph["recall"]
    return [
        f"Neighbour graph ({'built' if graph['built'] else 'reused'}, `{graph['folder']}`): {graph['method']}, "
        f"{graph['index']}, k={graph['k']}; recall@{graph['k']} against exact search "
        f"{recall['recall_at_k']:.4f} (recall@1 {recall['recall_at_1']:.4f}) on {recall['queries']} sampled rows. "
        f"{graph['saturated_rows']} rows have all {graph['k']} neighbours above the duplicate threshold "
        "(more copies than listed pairs; their clusters are complete).",
        "",
    ]


def _unchecked_lines(probe: Mapping[str, Any]) -> list[str]:
    unchecked = probe.get("classes_not_checked") or {}
    if not unchecked:
        return []
    names = ", ".join(f"{c} ({n})" for c, n in list(unchecked.items())[:10]) + (", ..." if len(unchecked) > 10 else "")
    return [
        f"**Not checked for label errors**: {len(unchecked)} classes with fewer than {probe['folds']} train + "
        f"validation images ({sum(unchecked.values())} images): {names}. Lower FOLDS to check them.",
        "",
    ]


def _reliability_lines(probe: Mapping[str, Any]) -> list[str]:
    if probe.get("reliable", True):
        return []
    return [
        f"**Label scores are unreliable here**: the probe's out-of-fold accuracy is "
        f"{probe['out_of_fold_accuracy']:.1%}, so correct labels it disagrees with crowd the top of the ranking; "
        "treat the label issues as a list to look at, not as errors.",
        "",
    ]


def report(record: Mapping[str, Any], sheets: Sequence[str]) -> str:
    """audit.md: the counts, the top findings of each kind as tables, the sheets."""
    c, probe = record["counts"], record["probe"]
    findings = record["findings"]
    lines = [
        "# Data audit",
        "",
        f"Features: `{record['features']}`, {c['rows']} rows "
        f"({', '.join(f'{s} {n}' for s, n in c['rows_per_split'].items())}).",
        "",
        "| finding | count | EXCLUDE drops (train rows) |",
        "|---|---:|---:|",
        f"| duplicate pairs ({c['duplicate_clusters']} clusters; {c['cross_split_pairs']} across splits, "
        f"{c['byte_identical_pairs']} byte-identical) | {c['duplicate_pairs']} | {c['exclude']['duplicates']} |",
        f"| label issues ({c['label_issues_train']} in train) | {c['label_issues']} | {c['exclude']['label']} |",
        f"| outliers | {c['outliers']} | {c['exclude']['outlier']} |",
        f"| confused class pairs | {c['overlapping_class_pairs']} | - |",
        "",
        f"Probe: logistic head, C={probe['C']:g} ({probe['C_chosen_on']}), {probe['folds']}-fold out-of-fold "
        f"accuracy {probe['out_of_fold_accuracy']:.4f} on {probe['rows']} train + validation rows "
        f"({probe.get('features', 'features')}); "
        f"label issues by {probe['method']}.",
        "",
        *_graph_lines(record.get("graph")),
        *_reliability_lines(probe),
        *_unchecked_lines(probe),
        "Retrain without the flagged train rows: `make head EXCLUDE=<this folder>/audit.json "
        "[EXCLUDE_KINDS=duplicates,label,outlier]` (validation and test rows are never dropped).",
        "",
    ]
    top = int(record["config"]["top"]) or 20
    for kind, heading, header, row in _SECTIONS:
        mine = [f for f in findings if f["kind"] == kind]
        lines += [f"## {heading}", ""]
        if not mine:
            lines += ["None.", ""]
            continue
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        lines += [row(f) for f in mine[:top]]
        if len(mine) > top:
            lines.append(f"\n... and {len(mine) - top} more in audit.json.")
        lines.append("")
    lines += [f"![{s}]({s})" for s in sheets]
    return "\n".join(lines) + "\n"
