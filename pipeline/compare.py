"""`make compare`: cached features against fine-tuning against training from scratch.

The experiment people otherwise run by hand (the Keras blog's oxford_flowers102
table: frozen head 80.9%, from scratch 0.98%, full fine-tune 85.4%, last block
85.1% at a fraction of the time), for any dataset the pipeline reads. Rows:

    logistic       stage 2 logistic probe on cached features
    dense          stage 2 dense head on cached features
    finetune-top   stage 3 from the dense head, the top block unfrozen (blocks:1)
    finetune-all   stage 3 from the dense head, everything unfrozen
    scratch        stage 3 from random weights, everything trainable

The stage-3 rows share one epoch budget (`FINE_TUNE_EPOCHS`). Every row runs the
pipeline's own stages in `<out>/features` and `<out>/runs`, so nothing is
implemented twice and every stage's own caching and resumption applies. Finished
rows are recorded in `<out>/rows.json` with their settings and wall time; a rerun
with the same settings reuses them, and an interrupted comparison continues with
the first unfinished row.

Wall time is what the row costs on its own ("own"), and with what it needs first
("total": the features for the cached rows; features plus the dense head for the
fine-tuning rows, which start from it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline import plots
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadConfig, key_digest
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ROWS = ("logistic", "dense", "finetune-top", "finetune-all", "scratch")
ROWS_FILE = "rows.json"


@dataclass(frozen=True)
class Settings:
    """The stage configurations every row derives its own from."""

    features: FeaturesConfig
    head: HeadConfig
    finetune: FinetuneConfig
    out_dir: Path

    def features_for(self, *, scratch: bool = False) -> FeaturesConfig:
        changes = {"output_dir": str(self.out_dir / "features")}
        if scratch:
            changes["weights"] = "none"
        return dataclasses.replace(self.features, **changes)

    def head_for(self, name: str) -> HeadConfig:
        return dataclasses.replace(self.head, head=name, runs_dir=str(self.out_dir / "runs"))

    def finetune_for(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self.finetune, runs_dir=str(self.out_dir / "runs"), head_epochs=0, **changes)


@dataclass(frozen=True)
class Comparison:
    rows: list[dict[str, Any]]
    table: str
    files: tuple[Path, ...]


def compare(features: FeaturesConfig, head: HeadConfig, finetune: FinetuneConfig, *, out_dir: Path,
            rows: Sequence[str] = ROWS, progress: bool = True) -> Comparison:
    """Runs (or reuses) each row in `rows` and writes the table, bar chart and curves to `out_dir`."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ConfigError(f"Unknown comparison rows {unknown or rows!r}. Expected some of: {', '.join(ROWS)}.")
    from pipeline.extract import resolve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(resolve(features)[0], head, finetune, out_dir)
    done = _load_rows(out_dir)
    results = []
    for name in rows:
        identity = _identity(settings, name)
        cached = done.get(name)
        if cached and cached["identity"] == identity:
            log.info("compare: %s is up to date (%s)", name, cached["run_dir"])
        else:
            log.info("compare: running %s", name)
            cached = {**ROW_RUNNERS[name](settings, done, progress), "identity": identity}
            done[name] = cached
            _save_rows(out_dir, done)
        results.append({"row": name, **cached})
    return _write_outputs(out_dir, results, settings)


# ------------------------------------------------------------------------ rows
def _features(settings: Settings, done: dict[str, Any], progress: bool, *, scratch: bool = False) -> dict[str, Any]:
    """Stage 1 for the comparison, timed once and remembered."""
    from pipeline.extract import extract_features

    config = settings.features_for(scratch=scratch)
    record = done.get("_features")
    if record and record["identity"] == _digest(config.to_dict()) and Path(record["path"]).exists():
        return record
    started = time.perf_counter()
    result = extract_features(config, progress=progress)
    record = {"path": str(result.path), "seconds": round(time.perf_counter() - started, 2),
              "identity": _digest(config.to_dict())}
    done["_features"] = record
    _save_rows(settings.out_dir, done)
    return record


def _cached_head(name: str) -> Callable[..., dict[str, Any]]:
    def run(settings: Settings, done: dict[str, Any], progress: bool) -> dict[str, Any]:
        from pipeline.extract import resolve
        from pipeline.train import train_head

        features = _features(settings, done, progress)
        started = time.perf_counter()
        run = train_head(Path(features["path"]), settings.head_for(name), expect=resolve(settings.features_for())[1])
        own = time.perf_counter() - started
        head = run.head
        history = getattr(head, "history_", None) or {}
        return {
            "kind": f"{name} head on cached features",
            "run_dir": str(run.run_dir),
            "validation": _accuracy(run.metrics, "validation"),
            "test": _accuracy(run.metrics, "test"),
            "own_seconds": round(own, 2),
            "total_seconds": round(own + features["seconds"], 2),
            "trainable_parameters": _head_parameters(head),
            "val_accuracy_curve": history.get("val_accuracy", []),
        }

    return run


def _unfrozen(at: dict[str, Any]) -> str:
    """How much of the backbone a fine-tuning row trains, in words for the table."""
    if at["index"] == 0:
        return f"fine-tune all {at['layers']} layers"
    return f"fine-tune the top {at['layers'] - at['index']} of {at['layers']} layers (from {at['layer']})"


def _finetuned(name: str, **changes: Any) -> Callable[..., dict[str, Any]]:
    def run(settings: Settings, done: dict[str, Any], progress: bool) -> dict[str, Any]:
        from pipeline.finetune import finetune

        scratch = changes.get("from_scratch", False)
        prerequisite = 0.0
        if not scratch:
            if done.get("dense", {}).get("identity") != _identity(settings, "dense"):
                done["dense"] = {**ROW_RUNNERS["dense"](settings, done, progress),
                                 "identity": _identity(settings, "dense")}
                _save_rows(settings.out_dir, done)
            prerequisite = done["dense"]["total_seconds"]
        started = time.perf_counter()
        result = finetune(settings.features_for(scratch=scratch), settings.head_for("dense"),
                          settings.finetune_for(**changes), progress=progress)
        own = time.perf_counter() - started
        metrics = result.metrics
        curve = _history_column(result.run_dir / "history.csv", "val_accuracy")
        return {
            "kind": _unfrozen(metrics["fine_tune_at"]) + (", random weights" if scratch else ""),
            "run_dir": str(result.run_dir),
            "validation": _accuracy(metrics["after"], "validation"),
            "test": _accuracy(metrics["after"], "test"),
            "own_seconds": round(own, 2),
            "total_seconds": round(own + prerequisite, 2),
            "trainable_parameters": metrics["parameters"]["finetune"]["trainable"],
            "val_accuracy_curve": curve,
        }

    return run


ROW_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "logistic": _cached_head("logistic"),
    "dense": _cached_head("dense"),
    "finetune-top": _finetuned("finetune-top", fine_tune_at="blocks:1"),
    "finetune-all": _finetuned("finetune-all", fine_tune_at="all"),
    "scratch": _finetuned("scratch", fine_tune_at="all", from_scratch=True),
}


def _identity(settings: Settings, name: str) -> str:
    """A digest of every setting that changes a row's result."""
    parts: dict[str, Any] = {"row": name, "features": settings.features_for(scratch=name == "scratch").to_dict()}
    if name in ("logistic", "dense"):
        parts["head"] = settings.head_for(name).to_dict()
    else:
        parts["head"] = settings.head_for("dense").to_dict()
        parts["finetune"] = settings.finetune_for().to_dict()
    return _digest(parts)


def _digest(value: Any) -> str:
    return key_digest(json.loads(json.dumps(value, default=str)))


def _accuracy(metrics: dict[str, Any], split: str) -> float | None:
    return metrics[split]["accuracy"] if metrics.get(split) else None


def _head_parameters(head) -> int:
    if head.name == "dense":
        return int(head.model_.count_params())
    kernel, bias, _ = head.dense_weights()
    return int(kernel.size + bias.size)


def _history_column(path: Path, column: str) -> list[float]:
    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def _load_rows(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / ROWS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_rows(out_dir: Path, rows: dict[str, Any]) -> None:
    tmp = out_dir / f".{ROWS_FILE}.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, out_dir / ROWS_FILE)


# --------------------------------------------------------------------- outputs
def _write_outputs(out_dir: Path, results: list[dict[str, Any]], settings: Settings) -> Comparison:
    table = comparison_table(results, settings)
    (out_dir / "comparison.md").write_text(table)
    (out_dir / "comparison.json").write_text(json.dumps(
        {"features": settings.features.to_dict(), "head": settings.head.to_dict(),
         "finetune": settings.finetune.to_dict(), "rows": results}, indent=1, default=str) + "\n")
    bars = plots.comparison_bars(
        [r["row"] for r in results], [r["validation"] for r in results], [r["test"] for r in results],
        [r["total_seconds"] for r in results], out_dir / "comparison.png",
        title=f"{settings.features.data.name}, {settings.features.backbone}",
    )
    curves = plots.overlaid_curves({r["row"]: r["val_accuracy_curve"] for r in results if r["val_accuracy_curve"]},
                                   out_dir / "learning_curves.png", ylabel="validation accuracy")
    files = (out_dir / "comparison.md", out_dir / "comparison.json", bars, curves)
    return Comparison(rows=results, table=table, files=files)


def comparison_table(results: list[dict[str, Any]], settings: Settings) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    f = settings.features
    lines = [f"Comparison on {f.data.name}, {f.backbone} at {f.image_size} px; fine-tuning rows: "
             f"{settings.finetune.epochs} epochs, {settings.finetune.optimizer}.", "",
             "| row | what | validation acc | test acc | own s | total s | trainable params |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['kind']} | {fmt(r['validation'])} | {fmt(r['test'])} | "
                     f"{r['own_seconds']:.1f} | {r['total_seconds']:.1f} | {r['trainable_parameters']:,} |")
    return "\n".join(lines) + "\n"
