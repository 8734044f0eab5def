"""Stage 2: train a light head on cached features, evaluate it, write a run directory.

The backbone never runs here, which is why a retrain takes seconds. Hyper-parameters
are chosen on the validation split only; the test split is scored once, at the end.

A run directory (`runs/<feature file>__<head>/`) holds::

    head.joblib | head.keras, head.json    the fitted head
    labels.txt                             class names in output order
    config.json                            features config + key, head config
    metrics.json                           validation and test metrics, chosen hyper-parameters
    history.csv, tensorboard/              dense head only
    learning_curves.png                    dense head only
    confusion_matrix.png, top_losses.png   on test (validation if there is no test split)
    report.md                              the table and the plots

`pipeline.runs` owns this directory: its name (`run_dir_for`), its atomic write
(assembled in a temporary directory and moved into place at the end, so a failed
run never leaves a half-written directory or clobbers the previous one), the
"is it current?" check and the readers.

Augmented views of the train split (stage 1 with AUG_VIEWS) are used as
`HeadConfig.views` says: by default all of them for the dense head, none for the
logistic one. `HeadConfig.train_per_class` trains on a seeded, stratified subset
of the train split (few-shot); the views of the chosen examples come with them.
Review decisions (`pipeline.decisions`, DECISIONS; EXCLUDE records an audit's flagged
train rows there first) drop excluded train and validation rows, views included, and
give relabelled rows their new label. Test rows change only with DECISIONS_TEST=1,
and then the test score is reported with and without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import runs
from pipeline.audit.exclusion import planned_decisions
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.decisions import apply_to_splits, digest_cache_for, effective, report_lines
from pipeline.digests import DigestCache, row_digests
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features.pictures import read_images
from pipeline.features.sources import stratified_rows
from pipeline.features.store import (
    VIEWS_SPLIT,
    FeatureRows,
    FeatureSet,
    SplitArrays,
    open_rows,
    read_attrs,
    read_features,
)
from pipeline.heads.base import Head
from pipeline.heads.registry import head_class, load_head
from pipeline.locks import exclusive
from pipeline.metrics import classification_metrics
from pipeline.options import parse_size
from pipeline.phases import Phases
from pipeline.runs import run_dir_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRun:
    """A finished stage-2 run; `up_to_date` means it was found finished, not retrained.

    `phases`: this process's seconds per phase of the stage (`pipeline.phases`), for
    `bench/profile.md`; a run found up to date has only the phases it went through.
    """

    run_dir: Path
    head: Head
    metrics: dict[str, Any]
    up_to_date: bool = False
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"head: {self.head.name}" + (" (up to date, not retrained)" if self.up_to_date else "")]
        used = self.metrics.get("views") or {}
        if used.get("train_per_class"):
            parts.append(f"{used['train_per_class']} train examples per class")
        if used.get("used"):
            parts.append(f"{used['used']} augmented views ({used['how']})")
        for split in ("validation", "test"):
            if self.metrics.get(split):
                parts.append(f"{split} accuracy {self.metrics[split]['accuracy']:.4f}")
        parts.append(f"trained in {self.metrics['training_seconds']:.2f} s -> {self.run_dir}")
        return ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """The result as JSON (`--json`): what `make bench` reads instead of the summary line."""
        return {
            "stage": "head",
            "run_dir": str(self.run_dir),
            "head": self.head.name,
            "up_to_date": self.up_to_date,
            "metrics": self.metrics,
            "phases": dict(self.phases),
        }


def memory_budget(config: HeadConfig) -> int:
    """MEMORY_BUDGET in bytes; by default a quarter of this machine's RAM."""
    if config.memory_budget is not None:
        return parse_size(config.memory_budget, "MEMORY_BUDGET")
    import psutil

    return psutil.virtual_memory().total // 4


def train_head(
    features_path: Path, config: HeadConfig, *, expect: Mapping[str, Any] | None = None, phases: Phases | None = None
) -> HeadRun:
    """Fits `config.head` on the train split of `features_path` and writes its run directory.

    The train rows are read into memory when the head's `memory_copies` of them (as
    float32) fit `memory_budget(config)`; else the head trains on them streamed from
    the file (`Head.fit_streamed`: the dense head streams, the logistic head refuses).
    `metrics.json` says which (`memory`). The lock on the run directory
    (`pipeline.locks.exclusive`) is held from the "is it up to date?" check to the
    rename: a second run of the same head waits, then finds the run finished.
    `phases` (a caller's, to add its own phases before these) times the stage's phases.
    """
    phases = phases if phases is not None else Phases()
    if config.exclude is not None:
        from pipeline.audit.exclusion import record_exclusion

        record_exclusion(features_path, config, read_attrs(features_path)["key"])
    run_dir = run_dir_for(features_path, config)
    waited = time.perf_counter()
    with exclusive(run_dir, what="run directory"):
        phases.add("lock", time.perf_counter() - waited)
        run = _train_head(features_path, config, run_dir, expect=expect, phases=phases)
    return replace(run, phases=phases.record())


def _train_head(
    features_path: Path, config: HeadConfig, run_dir: Path, *, expect: Mapping[str, Any] | None, phases: Phases
) -> HeadRun:
    """`train_head` under its lock: the finished run if current, else read, fit, evaluate and write a new one."""
    with phases("read features"):
        cached = read_features(features_path, expect=expect, exclude=[VIEWS_SPLIT])  # train: block by block
    with phases("up-to-date check"):
        used = _views_record(cached, config)
        finished = _finished_run(run_dir, cached, config, used)
    if finished:
        return finished
    with phases("read features"):
        rows = _check_splits(cached)
    if cached.splits.get("test") is None:
        log.warning("%s has no test split: reporting validation metrics only.", features_path)
    rows, splits, decided = _train_rows(rows, cached, config, used)
    head = head_class(config.head).from_config(config)
    budget = memory_budget(config)
    memory = {"budget_bytes": budget, "train_bytes": rows.nbytes, "streamed": rows.nbytes * head.memory_copies > budget}
    with phases("import libraries"):
        head.import_libraries()
    with runs.assembling(run_dir) as work:
        _fit(head, rows, splits["validation"], len(cached.class_names), work, memory, phases)
        with phases("evaluate"):
            metrics = _metrics(head, features_path, cached, config, rows, splits, used, decided, memory)
        _write_run(work, head, cached, config, metrics, phases)
        finishing = time.perf_counter()
    phases.add("finish", time.perf_counter() - finishing)  # the run directory moved into place
    return HeadRun(run_dir=run_dir, head=head, metrics=metrics)


def _train_rows(
    rows: FeatureRows, cached: FeatureSet, config: HeadConfig, used: Mapping[str, Any]
) -> tuple[FeatureRows, dict[str, SplitArrays], dict[str, Any] | None]:
    """The rows the head fits and is scored on: decisions applied, TRAIN_PER_CLASS chosen, views attached.

    Returns the train rows, the validation and test splits (and `test_as_given`, the
    test split before its decisions, with DECISIONS_TEST), and what the decisions did
    (None without decisions).
    """
    splits = {n: cached.splits[n] for n in ("validation", "test") if cached.splits.get(n) is not None}
    decided = None
    path, decisions = planned_decisions(cached.path, config)
    if path is not None and effective(decisions):
        rows, splits, decided = _apply(path, decisions, rows, splits, cached, config)
    if config.train_per_class is not None:
        rows = rows.select(
            stratified_rows(rows.labels, rows.index, config.train_per_class, list(cached.class_names), seed=config.seed)
        )
    return rows.with_views(used["used"]), splits, decided


def _apply(
    path: Path,
    decisions: Mapping[str, Any],
    rows: FeatureRows,
    splits: dict[str, SplitArrays],
    cached: FeatureSet,
    config: HeadConfig,
) -> tuple[FeatureRows, dict[str, SplitArrays], dict[str, Any]]:
    """The decisions of `path` applied to the train rows and the validation and test splits."""
    data_dir = (cached.config.get("data") or {}).get("data_dir")
    if not data_dir:
        raise ConfigError(
            f"{path} holds decisions, but {cached.path} names no image folder (a tfds dataset): decisions are "
            "keyed by image files. Set DECISIONS=none to train without them."
        )
    cache = DigestCache(digest_cache_for(path))
    every = {"train": (rows.ids, rows.labels), **{n: (s.ids, s.labels) for n, s in splits.items()}}
    digests = {n: row_digests(Path(data_dir), ids, cache) for n, (ids, _) in every.items()}
    applied = apply_to_splits(
        path,
        decisions,
        {n: (digests[n], every[n][1]) for n in every},
        cached.class_names,
        test=config.decisions_test,
    )
    rows = dataclasses.replace(rows, labels=applied.labels["train"]).select(np.flatnonzero(applied.keep["train"]))
    out = {}
    for n, split in splits.items():
        keep = applied.keep[n]
        out[n] = SplitArrays(
            features=split.features[keep], labels=applied.labels[n][keep], ids=split.ids[keep], index=split.index[keep]
        )
    if "test" in splits and config.decisions_test:
        out["test_as_given"] = splits["test"]
    for n, split in (("train", rows), ("validation", out["validation"])):
        if len(np.unique(split.labels)) < 2:
            raise ConfigError(
                f"The decisions in {path} leave {len(split.labels)} {n} rows of "
                f"{len(np.unique(split.labels))} classes; a head needs 2. Undo some exclusions with `make review`."
            )
    record = applied.record()
    log.info(
        "decisions (%s): train %d excluded, %d relabelled; validation %d excluded, %d relabelled%s.",
        path,
        *(record["applied"][n][k] for n in ("train", "validation") for k in ("exclude", "relabel")),
        f"; test {record['applied']['test']['exclude']} excluded, {record['applied']['test']['relabel']} relabelled"
        if config.decisions_test and "test" in splits
        else "",
    )
    return rows, out, record


def _fit(
    head: Head,
    rows: FeatureRows,
    validation: SplitArrays,
    n_classes: int,
    work: Path,
    memory: Mapping[str, Any],
    phases: Phases,
) -> None:
    """Fits `head` on `rows`: in memory, or streamed from the file when `memory` says they do not fit."""
    if memory["streamed"]:
        log.info(
            "%d train rows x %d versions take %.2f GB as float32, %d times that over MEMORY_BUDGET "
            "(%.2f GB): streaming them from %s",
            len(rows),
            rows.num_views + 1,
            rows.nbytes / 1e9,
            head.memory_copies,
            memory["budget_bytes"] / 1e9,
            rows.path,
        )
        with phases("fit"):
            head.fit_streamed(
                rows,
                validation.features,
                validation.labels,
                n_classes=n_classes,
                callbacks=head.training_callbacks(work),
                memory_budget=memory["budget_bytes"],
            )
        return
    with phases("read features"):
        train, views = rows.load()
    with phases("fit"):
        head.fit(
            train.features,
            train.labels,
            validation.features,
            validation.labels,
            n_classes=n_classes,
            callbacks=head.training_callbacks(work),
            views=views,
        )


def _metrics(
    head: Head,
    features_path: Path,
    cached: FeatureSet,
    config: HeadConfig,
    rows: FeatureRows,
    splits: Mapping[str, SplitArrays],
    used: Mapping[str, Any],
    decided: dict[str, Any] | None,
    memory: dict[str, Any],
) -> dict[str, Any]:
    """metrics.json: what was trained on, the chosen hyper-parameters, and the scores on validation and test.

    With DECISIONS_TEST, `test` is the score on the decided test split and
    `test_without_decisions` the one on the split as given.
    """
    class_names = list(cached.class_names)
    validation, test = splits["validation"], splits.get("test")
    metrics = {
        "head": config.head,
        "features": str(features_path),
        "train_examples": len(rows),
        "views": used,
        "decisions": decided,
        "memory": memory,
        "hyperparameters": head.params_,
        "training_seconds": head.params_["fit_seconds"],
        "validation": classification_metrics(head.predict_proba(validation.features), validation.labels, class_names),
        "test": classification_metrics(head.predict_proba(test.features), test.labels, class_names) if test else None,
    }
    given = splits.get("test_as_given")
    if given is not None:
        metrics["test_without_decisions"] = classification_metrics(
            head.predict_proba(given.features), given.labels, class_names
        )
    if test is None:
        metrics["note"] = "no test split: validation metrics only"
    return metrics


def _finished_run(run_dir: Path, cached: FeatureSet, config: HeadConfig, used: dict[str, Any]) -> HeadRun | None:
    """The run in `run_dir` if it was trained on these features with this config.

    Training is deterministic for a seed, so such a run is what a retrain would give.
    Views are not in the features' key, so the views used are compared too: a file
    that gained views since makes the default dense run stale (a run on its first V
    views stays valid, since views never change once written).
    """
    found = runs.current(run_dir, {"features_key": cached.key, "head": config.to_dict()})
    if found is None or _without_available(found.config.get("views", _NO_VIEWS)) != _without_available(used):
        return None
    return HeadRun(run_dir=run_dir, head=load_head(run_dir), metrics=found.metrics, up_to_date=True)


_NO_VIEWS = {"used": 0}


def _without_available(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "available"}


def _views_record(cached: FeatureSet, config: HeadConfig) -> dict[str, Any]:
    """Which views a run uses and what they are (their augmentation and seed), as stored in config.json."""
    kind = head_class(config.head)
    used = config.views_used(cached.num_views, default=kind.default_views(cached.num_views))
    record: dict[str, Any] = dict(_NO_VIEWS)
    if used:
        a = cached.view_attrs
        record = {
            "used": used,
            "available": cached.num_views,
            "augment": a["augment"],
            "seed": a["seed"],
            "how": kind.views_use,
        }
    if config.train_per_class is not None:
        record["train_per_class"] = config.train_per_class
    return record


def _check_splits(cached: FeatureSet) -> FeatureRows:
    """The train rows (left in the file), once train and validation are known to exist with sane labels."""
    k = len(cached.class_names)
    try:
        rows = open_rows(cached.path, VIEWS_SPLIT)
    except CacheError:
        rows = None
    available = [*([VIEWS_SPLIT] if rows is not None else []), *cached.splits]
    missing = [s for s in ("train", "validation") if s not in available]
    if missing:
        raise DataError(
            f"{cached.path} has no {' or '.join(missing)} split; a head needs train and validation "
            f"(available: {', '.join(available)}). Rebuild the features with both splits."
        )
    for name, labels in [(VIEWS_SPLIT, rows.labels), *((n, s.labels) for n, s in cached.splits.items())]:
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise DataError(
                f"{cached.path}: split '{name}' has {int(bad.sum())} labels outside the {k} classes "
                f"{cached.class_names} (first: {int(labels[bad][0])}). The file is inconsistent; rebuild it."
            )
    return rows


def _write_run(
    work: Path, head: Head, cached: FeatureSet, config: HeadConfig, metrics: dict[str, Any], phases: Phases
) -> None:
    class_names = list(cached.class_names)
    with phases("save head"):
        head.save(work)
        runs.write_records(
            work,
            class_names=class_names,
            metrics=metrics,
            config={
                "features": cached.config,
                "features_key": cached.key,
                "features_path": str(cached.path),
                "head": config.to_dict(),
                "views": metrics["views"],
                "decisions": metrics.get("decisions"),
            },
        )
    with phases("import matplotlib"):  # here, not at the top: an up-to-date run draws nothing
        from pipeline import plots
    figures = []
    history = getattr(head, "history_", None)
    if history:
        with phases("plot learning curves"):
            names = list(history)
            runs.write_history(
                work,
                ["epoch", *names],
                [
                    {"epoch": epoch, **dict(zip(names, row))}
                    for epoch, row in enumerate(zip(*(history[n] for n in names)), start=1)
                ],
            )
            figures.append(plots.learning_curves(history, work / runs.LEARNING_CURVES))
    scored = "test" if metrics["test"] else "validation"
    with phases("plot confusion matrix"):
        figures.append(
            plots.confusion_matrix(
                metrics[scored]["confusion_matrix"],
                class_names,
                work / runs.CONFUSION_MATRIX,
                title=f"{config.head} head, {scored} split",
            )
        )
    with phases("plot top losses"):  # reading its images included
        grid = _predictions_grid(head, cached, scored, config, work / runs.TOP_LOSSES)
    if grid:
        figures.append(grid)
    with phases("report"):
        runs.write_report(work, report(metrics, class_names, [f.name for f in figures]))


def _predictions_grid(head: Head, cached: FeatureSet, split: str, config: HeadConfig, path: Path) -> Path | None:
    """The `grid_images` images of `split` with the highest loss, read back from the data source."""
    if config.grid_images == 0:
        return None
    rows = cached.splits[split]
    features = FeaturesConfig.from_dict(cached.config)
    return runs.top_losses_grid(
        head.predict_proba(rows.features),
        rows.labels,
        rows.index,
        cached.class_names,
        count=config.grid_images,
        split=split,
        path=path,
        read=lambda chosen: read_images(features, split, dict(zip(rows.index[chosen].tolist(), rows.ids[chosen]))),
        title=f"{head.name} head: top losses on {split} images",
    )


def report(metrics: Mapping[str, Any], class_names: list[str], figures: list[str]) -> str:
    """A short markdown report: headline numbers, per-class table, the figures."""
    splits = [s for s in ("validation", "test") if metrics.get(s)]
    lines = [f"# {metrics['head']} head", "", f"Features: `{metrics['features']}`", ""]
    lines += ["| split | n | accuracy | mean per-class accuracy | loss |", "|---|---:|---:|---:|---:|"]
    for s in splits:
        m = metrics[s]
        lines.append(f"| {s} | {m['n']} | {m['accuracy']:.4f} | {m['mean_per_class_accuracy']:.4f} | {m['loss']:.4f} |")
    if metrics.get("note"):
        lines += ["", f"Note: {metrics['note']}."]
    lines += report_lines(metrics.get("decisions"), metrics.get("test"), metrics.get("test_without_decisions"))
    chosen = {
        k: v for k, v in metrics["hyperparameters"].items() if k in ("C", "best_epoch", "epochs_run", "converged")
    }
    lines += ["", f"Training: {metrics['training_seconds']:.2f} s; {json.dumps(chosen)}", ""]
    views = metrics.get("views") or {}
    if views.get("used") or views.get("train_per_class"):
        lines[-1:] = [
            f"Train split: {metrics.get('train_examples')} examples"
            + (f" ({views['train_per_class']} per class)" if views.get("train_per_class") else "")
            + (
                f", {views['used']} augmented views each, {views['how']} (augmentation "
                f"{json.dumps(views['augment'])}, seed {views['seed']})"
                if views.get("used")
                else ""
            ),
            "",
        ]
    last = splits[-1]
    lines += [f"Per class ({last}):", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in class_names:
        c = metrics[last]["per_class"][name]
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines.append("")
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
