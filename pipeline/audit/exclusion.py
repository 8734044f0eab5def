"""EXCLUDE: an audit's flagged train rows, recorded as `exclude` decisions in the decisions file.

There is one mechanism that changes what training sees, the decisions file
(`pipeline.decisions`); EXCLUDE=<audit.json> [EXCLUDE_KINDS=...] is a shortcut that
writes `exclude` for the train rows the audit flags into it, through the same store
and lock as the review page, before training reads it. A decision already taken
for an image (on the page, or by hand) is left as it is: a person's word wins over
the automatic rule. Validation and test rows are never flagged for exclusion; the
page is where a person decides about them. A decision names content, so it cannot
drop one of two byte-identical copies: a flagged copy whose bytes the audit keeps in
another row is left alone (logged), rather than losing the image altogether.

Small on purpose: `pipeline.runs` and `make head` import it, never the audit itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.audit.record import excluded_ids, read_record
from pipeline.config import AUDIT_KINDS, HeadConfig, audit_kinds
from pipeline.decisions import (
    EXCLUDE,
    Decision,
    DecisionStore,
    dataset_of,
    decisions_path,
    digest_cache_for,
    read_decisions,
    resolve_decisions,
)
from pipeline.digests import DigestCache
from pipeline.errors import CacheError, ConfigError
from pipeline.features.store import key_diff

log = logging.getLogger(__name__)


def _kinds(kinds: str | None) -> tuple[str, ...]:
    return tuple((audit_kinds(kinds, "EXCLUDE_KINDS") if kinds else ",".join(AUDIT_KINDS)).split(","))


def exclusion_ids(record: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    chosen = excluded_ids(record["findings"], record["clusters"])
    return sorted({i for kind in kinds for i in chosen[kind]})


def _paths(record: Mapping[str, Any]) -> dict[str, str | None]:
    """id -> the image file the audit read it from (None: a tfds row, no file)."""
    found: dict[str, str | None] = {}
    for entry in [*record["findings"], *record["clusters"]]:
        for i, p in zip(entry.get("ids", ()), entry.get("paths", ()) or ()):
            found[i] = p
    return found


def exclusion_decisions(audit: str | os.PathLike, kinds: str | None, cache: DigestCache) -> dict[str, Decision]:
    """sha256 -> an `exclude` decision for each train row the audit flags (of `kinds`)."""
    record = read_record(Path(audit))
    paths = _paths(record)
    flagged = exclusion_ids(record, _kinds(kinds))
    out: dict[str, Decision] = {}
    unreadable = []
    for i in flagged:
        digest = cache.of(Path(paths[i])) if paths.get(i) else None
        if digest is None:
            unreadable.append(i)
            continue
        out[digest] = Decision(sha256=digest, path=i, decision=EXCLUDE)
    kept = {
        cache.of(Path(p))
        for c in record["clusters"]
        for i, p in zip(c["ids"], c["paths"])
        if p and i not in flagged and c["splits"][c["ids"].index(i)] == "train"
    }
    copies = [d.path for s, d in out.items() if s in kept]
    out = {s: d for s, d in out.items() if s not in kept}
    cache.save()
    if copies:
        log.info(
            "EXCLUDE: %d flagged byte-identical copies stay: a decision names content, and the audit keeps "
            "another copy of each (%s).",
            len(copies),
            ", ".join(copies[:3]),
        )
    if unreadable:
        raise ConfigError(
            f"EXCLUDE={audit} flags {len(unreadable)} rows whose image files cannot be read "
            f"({', '.join(unreadable[:3])}); decisions are keyed by file content. Rerun `make audit` on the "
            "current image folder (a tfds dataset has no files: review it with `make review` instead)."
        )
    return out


def planned_decisions(features_path: Path, config: HeadConfig) -> tuple[Path | None, dict[str, Decision]]:
    """The decisions file a run uses and its decisions, with EXCLUDE's rows as they will be recorded.

    Pure (writes nothing), so a run directory's name can be worked out before training
    (`pipeline.runs.run_dir_for`); `record_exclusion` then makes the file say the same.
    """
    if config.exclude is None:
        path = resolve_decisions(config.decisions, config.audit_dir, features_path)
        return path, (read_decisions(path) if path is not None else {})
    path = Path(config.decisions) if config.decisions else decisions_path(config.audit_dir, dataset_of(features_path))
    decided = read_decisions(path)
    planned = exclusion_decisions(config.exclude, config.exclude_kinds, DigestCache(digest_cache_for(path)))
    return path, {**planned, **decided}


def record_exclusion(features_path: Path, config: HeadConfig, features_key: Mapping[str, Any]) -> int:
    """Writes EXCLUDE's `exclude` decisions into the decisions file; returns how many were new.

    An audit of another feature file is an error, never applied by id alone.
    """
    record = read_record(Path(config.exclude))
    diff = key_diff(record.get("features_key"), features_key)
    if diff:
        raise CacheError(
            f"{config.exclude} is an audit of another feature file ({diff}). Expected an audit of "
            f"{features_path}: run `make audit` with the same feature variables, or drop EXCLUDE."
        )
    path, _ = planned_decisions(features_path, config)
    planned = exclusion_decisions(config.exclude, config.exclude_kinds, DigestCache(digest_cache_for(path)))
    with DecisionStore(path, record.get("class_names")) as store:
        decided = store.current()
        new = [d for s, d in planned.items() if s not in decided]
        for d in new:
            store.record(d.sha256, d.path, d.decision)
    log.info(
        "EXCLUDE: %d flagged train rows (%s) recorded as excluded in %s (%d already decided there, left as they were).",
        len(new),
        ",".join(_kinds(config.exclude_kinds)),
        path,
        len(planned) - len(new),
    )
    return len(new)
