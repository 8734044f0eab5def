"""The run directory: its paths, its atomic write, its "is it current?" check and its readers.

A run directory is the interface between stages: `make head` writes
`runs/<feature file>__<head>[...]/`, `make finetune` `runs/<stage-2 run>__ft-<at>/`,
and export, predict, finetune, compare and bench read them. Every run holds::

    labels.txt      class names in output order, one a line
    config.json     what the run was made from; its identity (`current`)
    metrics.json    what it measured
    history.csv     one row per epoch, when it trained by epochs
    report.md       the numbers and the figures
    + its stage's model files and figures (learning_curves.png, confusion_matrix.png, top_losses.png)

A run is assembled in a temporary folder beside its place and renamed into place
(`assembling`, `publish`), so a failed run never leaves a half-written directory or
clobbers the previous one; the lock of `pipeline.locks` is the caller's. A run is
finished when config.json and metrics.json both read; it is current when its
config.json holds the identity the caller asks for.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import HeadConfig
from pipeline.errors import CacheError

log = logging.getLogger(__name__)

LABELS = "labels.txt"
CONFIG = "config.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
REPORT = "report.md"
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
TOP_LOSSES = "top_losses.png"


# --------------------------------------------------------------------------- paths
def run_dir_for(features_path: Path, config: HeadConfig) -> Path:
    """A stage-2 run: `runs/<feature file>__<head>[__views-V][__N-per-class][__excl-<digest>]`.

    Explicit VIEWS and TRAIN_PER_CLASS name their own runs, so runs of one file with
    0, 2 or 5 views, or few-shot subsets, sit side by side; the default (VIEWS unset)
    keeps the plain name. Decisions that change rows (exclude, relabel; EXCLUDE's
    included, `pipeline.decisions`) add a digest of them, so a run is retrained when
    they change and runs with and without them sit side by side.
    """
    name = f"{Path(features_path).stem}__{config.head}"
    if config.views is not None:
        name += f"__views-{config.views}"
    if config.train_per_class is not None:
        name += f"__{config.train_per_class}-per-class"
    from pipeline.audit.exclusion import planned_decisions
    from pipeline.decisions import decisions_fingerprint, effective

    _, decisions = planned_decisions(features_path, config)
    if effective(decisions):
        name += f"__dec-{decisions_fingerprint(decisions, test=config.decisions_test)}"
    return Path(config.runs_dir) / name


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class RunRecord:
    """A finished run directory: its config.json and metrics.json."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

    def matches(self, identity: Mapping[str, Any]) -> bool:
        """Whether config.json holds every key of `identity` with the same value, as JSON."""
        wanted = json.loads(json.dumps(identity))
        return {k: self.config.get(k) for k in wanted} == wanted


def read_run(run_dir: Path) -> RunRecord | None:
    """The finished run in `run_dir`; None when there is none (or it is unreadable)."""
    try:
        return RunRecord(Path(run_dir), _read_json(Path(run_dir) / CONFIG), _read_json(Path(run_dir) / METRICS))
    except (OSError, ValueError):
        return None


def current(run_dir: Path, identity: Mapping[str, Any]) -> RunRecord | None:
    """The finished run in `run_dir` if its config.json holds `identity` (`RunRecord.matches`), else None.

    Stages are deterministic for their settings, so such a run is what a rerun would
    give; the caller decides what belongs in the identity.
    """
    record = read_run(run_dir)
    return record if record is not None and record.matches(identity) else None


def read_config(run_dir: Path) -> dict[str, Any]:
    return _read_record(Path(run_dir) / CONFIG)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return _read_record(Path(run_dir) / METRICS)


def read_labels(run_dir: Path) -> list[str]:
    """Class names in the order of the run's outputs."""
    path = Path(run_dir) / LABELS
    try:
        return path.read_text().splitlines()
    except OSError:
        raise CacheError(
            f"Expected class names in {path}; it cannot be read. Rerun the stage that wrote {Path(run_dir).name}."
        ) from None


def read_history(run_dir: Path) -> list[dict[str, str]]:
    """The rows of history.csv (one per epoch) as written; [] when the run has none."""
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def history_column(run_dir: Path, column: str) -> list[float]:
    """One column of history.csv as floats, epochs that lack it left out."""
    return [float(row[column]) for row in read_history(run_dir) if row.get(column)]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return _read_json(path)
    except (OSError, ValueError) as err:
        raise CacheError(
            f"Expected a run record at {path}; it cannot be read ({type(err).__name__}). Rerun "
            f"the stage that writes {path.parent.name}."
        ) from None


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def assembling(run_dir: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `run_dir` to write the run into; on success it
    replaces `run_dir` (`publish`), on an error it is removed and `run_dir` stays as it was."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    try:
        yield work
        publish(work, run_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish(work: Path, run_dir: Path) -> None:
    """Moves the assembled folder `work` into place as `run_dir`, replacing an earlier run."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(work, run_dir)


def write_records(
    work: Path, *, class_names: Sequence[str], config: Mapping[str, Any], metrics: Mapping[str, Any]
) -> None:
    """labels.txt, config.json (keys sorted) and metrics.json of a run being assembled in `work`."""
    (work / LABELS).write_text("\n".join(class_names) + "\n")
    (work / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (work / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def write_history(work: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """history.csv: `columns`, then one line per epoch (a missing value as an empty cell)."""
    path = work / HISTORY
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_report(work: Path, text: str) -> Path:
    path = work / REPORT
    path.write_text(text)
    return path


def write_json(path: Path, value: Any) -> Path:
    """`value` as JSON at `path`, written under a temporary name and renamed (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- figures
def top_loss_rows(proba: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Rows with the highest cross-entropy -log p(true label), highest first (ties: row order)."""
    p_true = np.asarray(proba, np.float64)[np.arange(len(labels)), labels]
    return np.argsort(p_true, kind="stable")[:count]


def top_losses_grid(
    proba: np.ndarray,
    labels: np.ndarray,
    positions: np.ndarray,
    class_names: Sequence[str],
    *,
    count: int,
    read: Callable[[np.ndarray], Mapping[int, Any]],
    split: str,
    title: str,
    path: Path,
) -> Path | None:
    """The `count` examples with the highest loss (fastai's top losses), what a model gets most
    wrong or is least sure of, as a picture grid at `path`; None, logged, when none can be shown.

    `proba` (N, K), `labels` (N,) and `positions` (N,, split positions) describe the
    scored split; `read(rows)` returns {position: image} for some rows of it (the
    images may have moved since extraction: the figure is optional, so a failure is
    logged, never raised).
    """
    if count == 0:
        return None
    chosen = top_loss_rows(proba, labels, count)
    try:
        images = read(chosen)
    except Exception as err:  # the plot is optional; the metrics are not
        log.warning("No top-losses grid: cannot read the %s images back (%s).", split, err)
        return None
    chosen = np.array([c for c in chosen if int(positions[c]) in images], np.int64)
    if not len(chosen):
        log.warning("No top-losses grid: none of the %s images can be read back (moved?).", split)
        return None
    from pipeline import plots

    truth, picked = labels[chosen], proba[chosen]
    p_true = picked[np.arange(len(chosen)), truth]
    return plots.top_losses(
        [images[int(p)] for p in positions[chosen]],
        [class_names[t] for t in truth],
        [class_names[p] for p in picked.argmax(axis=1)],
        picked.max(axis=1).tolist(),
        p_true.tolist(),
        (-np.log(np.clip(p_true, 1e-15, 1))).tolist(),
        path,
        title=title,
    )
