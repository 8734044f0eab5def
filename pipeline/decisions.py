"""The decisions file: what a person decided about images, keyed by content; the one store and reader.

What a person decides about an image (keep it, leave it out of training, give it
another label) must outlive the audit, the feature file and renames of the image
folder, so a decision is keyed by the sha256 of the image file's bytes, not by its
path: moving `train/cats/x.jpg` to `train/dogs/x.jpg` keeps its decision, and every
byte-identical copy shares one.

Where: one file per dataset, `<AUDIT_DIR>/<dataset>.decisions.csv` (`decisions_path`),
beside the audit folders rather than inside one: `make audit` replaces its folder
wholesale, and decisions keyed by content hold for every backbone's audit of the
dataset. DECISIONS=path names another file; DECISIONS=none turns them off.

The file (columns sha256, path, decision, label, time) is append-only: each click
appends one row, flushed and fsynced before the page is told it is saved, so a
crash loses at most the click in flight and a half-written last line is skipped
with a warning on the next read. The latest row per sha256 wins (file order, not
the time column, which a hand edit may get wrong); `undecided` takes a decision
back. It stays a plain CSV a person can read, edit or `grep`; `path` is only where
the image was when decided.

One writer at a time: `DecisionStore` holds `pipeline.locks.exclusive` on the file
(without waiting) from `open` to `close`; a second writer fails at once naming the
first. `apply_decisions` turns decisions into what training needs and never fails
on a stale decision: images no row holds and classes the features lack are counted
and logged.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import fingerprint
from pipeline.errors import ConfigError
from pipeline.locks import exclusive

log = logging.getLogger(__name__)

DECISIONS_SUFFIX = ".decisions.csv"
#: DECISIONS=none: train without decisions, even where the dataset has a decisions file.
NO_DECISIONS = "none"
COLUMNS = ("sha256", "path", "decision", "label", "time")
KEEP, EXCLUDE, RELABEL, UNDECIDED = "keep", "exclude", "relabel", "undecided"
CHOICES = (KEEP, EXCLUDE, RELABEL, UNDECIDED)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def dataset_of(features_path: Path) -> str:
    """The dataset part of a feature file's name (`config.feature_file_name`: '<dataset>__<backbone>__...')."""
    return Path(features_path).stem.split("__")[0]


def decisions_path(audit_dir: Path, dataset: str) -> Path:
    """`<audit_dir>/<dataset>.decisions.csv`: the dataset's decisions, beside (not in) its audit folders."""
    return Path(audit_dir) / f"{dataset}{DECISIONS_SUFFIX}"


def digest_cache_for(path: Path) -> Path:
    """`<dataset>.decisions.digests.csv`: the sha256 cache of the files a decisions file is applied to."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".csv") + ".digests.csv")


def resolve_decisions(setting: str | None, audit_dir: str | Path, features_path: Path) -> Path | None:
    """The decisions file training applies: DECISIONS=path, none, or by default the dataset's own if it exists.

    An explicit path that does not exist is an error (a typo must not train without
    decisions); the default file is optional, since most datasets are never reviewed.
    """
    if setting == NO_DECISIONS:
        return None
    if setting:
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(
                f"DECISIONS must name a decisions file of `make review`. Received: {setting!r}, which does "
                f"not exist. Fix the path, or leave DECISIONS unset to use {decisions_path(audit_dir, '<dataset>')}."
            )
        return path
    default = decisions_path(Path(audit_dir), dataset_of(features_path))
    return default if default.is_file() else None


@dataclass(frozen=True)
class Decision:
    """One row of the decisions file; `label` is the new class name for `relabel`, else ''."""

    sha256: str
    path: str
    decision: str
    label: str = ""
    time: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_decision(sha256: str, decision: str, label: str, class_names: Sequence[str] | None = None) -> None:
    """Raises ConfigError (one line: what was received, what to send) for a decision that cannot be stored."""
    if not _SHA256.match(sha256 or ""):
        raise ConfigError(f"Expected sha256 as 64 lowercase hex digits. Received: {sha256!r}.")
    if decision not in CHOICES:
        raise ConfigError(f"Expected decision in {', '.join(CHOICES)}. Received: {decision!r}.")
    if decision == RELABEL:
        if not label:
            raise ConfigError("A relabel decision needs a label (a class name). Received none.")
        if class_names is not None and label not in class_names:
            raise ConfigError(f"Expected a label in the classes {', '.join(class_names)}. Received: {label!r}.")
    elif label:
        raise ConfigError(f"Only relabel takes a label; {decision} received label {label!r}. Drop the label.")


def read_decisions(path: Path) -> dict[str, Decision]:
    """sha256 -> its latest decision in `path` (file order); {} when the file does not exist.

    Rows that cannot be used (a half-written last line after a crash, a typo from a
    hand edit) are skipped and logged with their line numbers, never fatal: the
    other decisions are still good. A header without the expected columns is an
    error, since every row would then be misread.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ConfigError(
            f"{path}: expected the header {','.join(COLUMNS)}; columns {', '.join(missing)} are "
            "missing. Fix the first line by hand, or move the file away to start afresh."
        )
    latest: dict[str, Decision] = {}
    bad: list[int] = []
    for row in reader:
        values = {c: (row.get(c) or "").strip() for c in COLUMNS}
        try:
            check_decision(values["sha256"], values["decision"], values["label"])
        except ConfigError:
            bad.append(reader.line_num)
            continue
        latest[values["sha256"]] = Decision(**values)
    if bad:
        log.warning(
            "%s: skipped %d unusable rows (lines %s); a crash mid-write or a hand edit? The other decisions stand.",
            path,
            len(bad),
            ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""),
        )
    return latest


def decision_counts(decisions: Mapping[str, Decision]) -> dict[str, int]:
    """How many images have each decision (undecided included: a decision taken back)."""
    counts = {c: 0 for c in CHOICES}
    for d in decisions.values():
        counts[d.decision] += 1
    return counts


class DecisionStore:
    """The one writer of a decisions file, holding its lock from `open` to `close`.

    `record` is safe to call from the server's request threads: rows are appended
    under a thread lock, so two clicks never interleave within a line.
    `class_names`, when given, is checked by `record` (a page offering a class that
    the audit does not know is a bug); reading never checks it (see `apply_decisions`).
    """

    def __init__(self, path: Path, class_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.class_names = list(class_names) if class_names is not None else None
        self._lock: contextlib.ExitStack | None = None
        self._file: io.TextIOWrapper | None = None
        self._decisions: dict[str, Decision] = {}
        self._threads = threading.Lock()

    # ------------------------------------------------------------- lifecycle
    def open(self) -> DecisionStore:
        """Takes the lock (or raises LockError at once, naming the holder), reads the file, opens it for appending."""
        stack = contextlib.ExitStack()
        stack.enter_context(exclusive(self.path, what="decisions file", wait=False))
        try:
            self._decisions = read_decisions(self.path)
            self._file = stack.enter_context(self._open_for_append())
        except BaseException:
            stack.close()
            raise
        self._lock = stack
        log.info("decisions: %s (%d images decided), this process writes it.", self.path, len(self._decisions))
        return self

    def close(self) -> None:
        """Closes the file and releases the lock; safe to call twice."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            self._file = None

    def __enter__(self) -> DecisionStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_for_append(self) -> io.TextIOWrapper:
        """Opens for appending; writes the header into a new file, and ends a crash's half line first."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                ends_with_newline = f.read(1) in (b"\n", b"\r")
        handle = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._append(handle, COLUMNS)
        elif not ends_with_newline:
            handle.write("\n")  # the half row stays on its own line (skipped on read), the next row is whole
            self._sync(handle)
        return handle

    # -------------------------------------------------------------- decisions
    def current(self) -> dict[str, Decision]:
        """sha256 -> latest decision (a copy)."""
        with self._threads:
            return dict(self._decisions)

    def get(self, sha256: str) -> Decision | None:
        with self._threads:
            return self._decisions.get(sha256)

    def record(self, sha256: str, path: str, decision: str, label: str = "") -> Decision:
        """Appends one decision, durable (flushed and fsynced) when this returns."""
        if self._file is None:
            raise RuntimeError("DecisionStore.record called before open()")  # a bug, not a user error
        label = label or ""
        check_decision(sha256, decision, label, self.class_names)
        row = Decision(
            sha256=sha256,
            path=path,
            decision=decision,
            label=label,
            time=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
        with self._threads:
            self._append(self._file, [row.sha256, row.path, row.decision, row.label, row.time])
            self._decisions[sha256] = row
        log.debug("decision: %s %s %s", decision, label, path)
        return row

    @classmethod
    def _append(cls, handle: io.TextIOWrapper, values: Iterable[str]) -> None:
        csv.writer(handle, lineterminator="\n").writerow(values)
        cls._sync(handle)

    @staticmethod
    def _sync(handle: io.TextIOWrapper) -> None:
        handle.flush()
        os.fsync(handle.fileno())


def effective(decisions: Mapping[str, Decision]) -> dict[str, Decision]:
    """The decisions that change rows: exclude and relabel (keep and undecided change nothing)."""
    return {s: d for s, d in decisions.items() if d.decision in (EXCLUDE, RELABEL)}


def decisions_fingerprint(decisions: Mapping[str, Decision], *, test: bool = False, length: int = 8) -> str:
    """A short digest of what the decisions change (exclude and relabel only), for a run directory's name.

    Keep and undecided rows, times and paths are left out: reviewing more images
    without changing anything must not make training start a new run. `test`
    (DECISIONS_TEST) is part of it, since it changes what the test split holds.
    """
    effective = sorted([d.sha256, d.decision, d.label] for d in decisions.values() if d.decision in (EXCLUDE, RELABEL))
    return fingerprint({"decisions": effective, "test": bool(test)}, length=length)


# ------------------------------------------------------------------- applying
@dataclass(frozen=True)
class Applied:
    """Decisions applied to N rows: `keep` (N,) bool, `labels` (N,) int64 after relabelling.

    `counts`: rows excluded / relabelled / kept by decision (a sha256 shared by
    byte-identical copies counts each row). `unknown_images`: decisions whose sha256
    no row holds; `unknown_classes`: relabel decisions to a class not in
    `class_names` (ignored); `rows_without_digest`: rows no decision can reach.
    `warnings`: one line per kind of problem, also logged.
    """

    keep: np.ndarray
    labels: np.ndarray
    counts: dict[str, int]
    unknown_images: int = 0
    unknown_classes: int = 0
    rows_without_digest: int = 0
    warnings: list[str] = field(default_factory=list)


def apply_decisions(
    decisions: Mapping[str, Decision], digests: Sequence[str | None], labels: Sequence[int], class_names: Sequence[str]
) -> Applied:
    """What the decisions do to rows with these sha256 `digests` and integer `labels`.

    exclude -> keep False; relabel -> labels[row] = class_names.index(label); keep
    and undecided change nothing (keep is counted: a person looked and agreed).
    Never raises for stale decisions; see `Applied`.
    """
    labels_out = np.asarray(labels, np.int64).copy()
    keep = np.ones(len(labels_out), bool)
    class_index = {name: i for i, name in enumerate(class_names)}
    counts = {EXCLUDE: 0, RELABEL: 0, KEEP: 0}
    seen: set[str] = set()
    bad_class: set[str] = set()
    for row, digest in enumerate(digests):
        decision = decisions.get(digest) if digest is not None else None
        if decision is None:
            continue
        seen.add(digest)
        if decision.decision == EXCLUDE:
            keep[row] = False
            counts[EXCLUDE] += 1
        elif decision.decision == RELABEL:
            if decision.label not in class_index:
                bad_class.add(digest)
                continue
            labels_out[row] = class_index[decision.label]
            counts[RELABEL] += 1
        elif decision.decision == KEEP:
            counts[KEEP] += 1
    unknown = [d for s, d in decisions.items() if s not in seen and d.decision != UNDECIDED]
    without = sum(d is None for d in digests)
    warnings = []
    if unknown:
        warnings.append(
            f"{len(unknown)} decisions name images these rows do not hold (other splits, or files "
            f"changed since): {', '.join(d.path for d in unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
        )
    if bad_class:
        names = sorted({decisions[s].label for s in bad_class})
        warnings.append(
            f"{len(bad_class)} relabel decisions name classes the features do not have "
            f"({', '.join(names[:5])}); left as they were"
        )
    if without:
        warnings.append(f"{without} rows have no sha256 (unreadable files), so no decision reaches them")
    for line in warnings:
        log.warning("decisions: %s.", line)
    return Applied(
        keep=keep,
        labels=labels_out,
        counts=counts,
        unknown_images=len(unknown),
        unknown_classes=len(bad_class),
        rows_without_digest=without,
        warnings=warnings,
    )


@dataclass(frozen=True)
class SplitDecisions:
    """Decisions applied to the rows of several splits: per split `keep` (N,) bool and `labels` (N,) int64.

    `test` says whether the test split's decisions were applied (DECISIONS_TEST); when
    not, its `keep` and `labels` are as given and `pending` counts what would change.
    `record()` is what metrics.json and report.md say about them.
    """

    path: Path
    fingerprint: str
    keep: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    counts: dict[str, dict[str, int]]
    test: bool
    pending: dict[str, int]
    applied: Applied

    def record(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "fingerprint": self.fingerprint,
            "applied": self.counts,
            "test_applied": self.test,
            "test_not_applied": self.pending,
            "unknown_images": self.applied.unknown_images,
            "unknown_classes": self.applied.unknown_classes,
            "rows_without_digest": self.applied.rows_without_digest,
            "warnings": list(self.applied.warnings),
        }


def apply_to_splits(
    path: Path,
    decisions: Mapping[str, Decision],
    rows: Mapping[str, tuple[Sequence[str | None], Sequence[int]]],
    class_names: Sequence[str],
    *,
    test: bool = False,
) -> SplitDecisions:
    """`apply_decisions` over every split at once (so an image is unknown only if no split holds it).

    `rows`: split -> (sha256 digests, integer labels). Test rows change only with
    `test=True`: a test score must never move silently.
    """
    names = list(rows)
    sizes = [len(rows[n][1]) for n in names]
    digests = [d for n in names for d in rows[n][0]]
    labels = np.concatenate([np.asarray(rows[n][1], np.int64) for n in names]) if names else np.zeros(0, np.int64)
    applied = apply_decisions(decisions, digests, labels, class_names)
    bounds = np.cumsum([0, *sizes])
    keep, relabelled, counts, pending = {}, {}, {}, {EXCLUDE: 0, RELABEL: 0}
    for n, a, b in zip(names, bounds[:-1], bounds[1:]):
        given = labels[a:b]
        keep[n], relabelled[n] = applied.keep[a:b].copy(), applied.labels[a:b].copy()
        changes = {EXCLUDE: int((~keep[n]).sum()), RELABEL: int((keep[n] & (relabelled[n] != given)).sum())}
        if n == "test" and not test:
            pending = changes
            keep[n], relabelled[n] = np.ones(b - a, bool), given.copy()
            changes = {EXCLUDE: 0, RELABEL: 0}
        counts[n] = changes
    if pending[EXCLUDE] or pending[RELABEL]:
        log.warning(
            "decisions: %d excluded and %d relabelled test images are not applied (the test score stays "
            "comparable); DECISIONS_TEST=1 applies them and reports test accuracy with and without.",
            pending[EXCLUDE],
            pending[RELABEL],
        )
    return SplitDecisions(
        path=Path(path),
        fingerprint=decisions_fingerprint(decisions, test=test),
        keep=keep,
        labels=relabelled,
        counts=counts,
        test=test,
        pending=pending,
        applied=applied,
    )


def report_lines(
    decided: Mapping[str, Any] | None, test: Mapping[str, Any] | None, test_as_given: Mapping[str, Any] | None
) -> list[str]:
    """report.md's account of the decisions a run applied (`SplitDecisions.record()`; None: no lines).

    `test` and `test_as_given` are the test metrics with and without the decisions
    (the second only with DECISIONS_TEST).
    """
    if not decided:
        return []
    parts = [f"{n} {c[EXCLUDE]} excluded, {c[RELABEL]} relabelled" for n, c in decided["applied"].items()]
    lines = ["", f"Decisions (`{decided['file']}`): {'; '.join(parts)}."]
    pending = decided["test_not_applied"]
    if pending[EXCLUDE] or pending[RELABEL]:
        lines.append(
            f"Not applied on test: {pending[EXCLUDE]} excluded, {pending[RELABEL]} relabelled "
            "(DECISIONS_TEST=1 applies them)."
        )
    if test and test_as_given:
        lines.append(
            f"Test accuracy with the decisions {test['accuracy']:.4f} (n={test['n']}), "
            f"without {test_as_given['accuracy']:.4f} (n={test_as_given['n']})."
        )
    lines += [f"Warning: {w}." for w in decided["warnings"]]
    return lines
