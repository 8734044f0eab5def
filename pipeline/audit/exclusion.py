"""EXCLUDE: the train rows an audit.json flags, checked against the feature file they leave.

Small on purpose: `pipeline.runs` and `make head` import it, never the audit itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.record import excluded_ids, read_record
from pipeline.config import AUDIT_KINDS, audit_kinds, fingerprint
from pipeline.errors import CacheError, ConfigError
from pipeline.features.store import FeatureSet, key_diff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exclusion:
    """The train rows an audit says to leave out: `keep` (N_train,) bool, `ids`, `digest`, `leaks`."""

    audit: Path
    kinds: tuple[str, ...]
    keep: np.ndarray
    ids: tuple[str, ...]
    digest: str
    leaks: tuple[dict[str, Any], ...]

    def record(self) -> dict[str, Any]:
        return {
            "audit": str(self.audit),
            "kinds": list(self.kinds),
            "digest": self.digest,
            "excluded": len(self.ids),
            "ids": list(self.ids),
            "leaks_kept": [{"ids": l["ids"], "splits": l["splits"]} for l in self.leaks],
        }


def _kinds(kinds: str | None) -> tuple[str, ...]:
    return tuple((audit_kinds(kinds, "EXCLUDE_KINDS") if kinds else ",".join(AUDIT_KINDS)).split(","))


def exclusion_ids(record: Mapping[str, Any], kinds: Sequence[str]) -> list[str]:
    chosen = excluded_ids(record["findings"], record["clusters"])
    return sorted({i for kind in kinds for i in chosen[kind]})


def exclusion_digest(audit: str | os.PathLike, kinds: str | None) -> str:
    """A short digest of what EXCLUDE leaves out, for the run directory's name."""
    kinds_ = _kinds(kinds)
    ids = exclusion_ids(read_record(Path(audit)), kinds_)
    return _exclusion_fingerprint(kinds_, ids)


def _exclusion_fingerprint(kinds: Sequence[str], ids: Sequence[str]) -> str:
    return fingerprint({"kinds": list(kinds), "ids": list(ids)}, length=8)


def load_exclusion(audit: str | os.PathLike, cached: FeatureSet, kinds: str | None, *, train=None) -> Exclusion:
    """The train rows of `cached` that the audit flags (of `kinds`), checked against its key.

    `train` holds the train rows' `ids` and `labels` when `cached` was read without them
    (`store.FeatureRows`, for a split left in the file); `keep` follows its rows.

    An audit of another feature file is an error, never applied by id alone. Only
    train rows are ever left out; flagged validation and test rows (leaks, label
    issues, outliers) are logged for the user to decide.
    """
    record = read_record(Path(audit))
    diff = key_diff(record.get("features_key"), cached.key)
    if diff:
        raise CacheError(
            f"{audit} is an audit of another feature file ({diff}). Expected an audit of {cached.path}: "
            "run `make audit` with the same feature variables, or drop EXCLUDE."
        )
    kinds_ = _kinds(kinds)
    ids = exclusion_ids(record, kinds_)
    train = cached.splits["train"] if train is None else train
    position = {str(i): r for r, i in enumerate(train.ids)}
    unknown = [i for i in ids if i not in position]
    if unknown:
        raise CacheError(
            f"{audit} names train ids that {cached.path} does not hold ({', '.join(unknown[:3])}); rerun `make audit`."
        )
    keep = np.ones(len(train), bool)
    keep[[position[i] for i in ids]] = False
    left = np.unique(train.labels[keep])
    if len(left) < 2:
        raise ConfigError(
            f"EXCLUDE={audit} with kinds {','.join(kinds_)} leaves {int(keep.sum())} of {len(train)} train rows "
            f"({len(left)} classes); a head needs 2 classes. Look at the audit's contact sheets (a loose "
            "DUPLICATE_THRESHOLD?) or choose fewer EXCLUDE_KINDS."
        )
    leaks = tuple(c for c in record["clusters"] if c["cross_split"])
    kept = [
        (f["ids"][0], f["splits"][0], f["kind"])
        for f in record["findings"]
        if f["kind"] in kinds_ and f["kind"] != "duplicates" and f["splits"][0] != "train"
    ]
    if leaks and "duplicates" in kinds_:
        log.warning(
            "EXCLUDE: %d duplicate clusters reach validation/test (leaks); their train copies are left out, "
            "the validation/test copies stay (yours to decide): %s",
            len(leaks),
            "; ".join(" = ".join(c["ids"]) for c in leaks[:5]) + ("; ..." if len(leaks) > 5 else ""),
        )
    if kept:
        log.warning(
            "EXCLUDE: %d flagged validation/test rows stay in their splits (yours to decide): %s",
            len(kept),
            ", ".join(f"{i} ({k})" for i, _, k in kept[:5]) + (", ..." if len(kept) > 5 else ""),
        )
    digest = _exclusion_fingerprint(kinds_, ids)
    log.info("EXCLUDE: leaving %d of %d train rows out (%s).", len(ids), len(train), ", ".join(kinds_))
    return Exclusion(audit=Path(audit), kinds=kinds_, keep=keep, ids=tuple(ids), digest=digest, leaks=leaks)
