"""`make compare`: cached features against fine-tuning against training from scratch.

The experiment people otherwise run by hand (the Keras blog's oxford_flowers102
table: frozen head 80.9%, from scratch 0.98%, full fine-tune 85.4%, last block
85.1% at a fraction of the time), for any dataset the pipeline reads. Rows:

    logistic       stage 2 logistic probe on cached features
    dense          stage 2 dense head on cached features
    finetune-top   stage 3 from the dense head, the top block unfrozen (blocks:1)
    finetune-all   stage 3 from the dense head, everything unfrozen
    scratch        stage 3 from random weights, everything trainable

and, on request (augmentation without the backbone in the loop):

    dense-views-K     the dense head on plain features + K cached augmented views
    logistic-views-K  the logistic probe on the same, the views stacked as rows
    seed              the seed workflow: a fresh head trained EPOCHS epochs on images,
                      with live augmentation and the frozen backbone in the loop

The views and the seed row use the same augmentation (AUG_*), so `dense-views-K`
against `seed` is cached augmentation against live augmentation at the same number
of epochs. With TRAIN_PER_CLASS every row trains on the same few shots per class.

The stage-3 rows share one epoch budget (`FINE_TUNE_EPOCHS`). Every row runs the
pipeline's own stages in `<out>/features` and `<out>/runs`, so nothing is
implemented twice and every stage's own caching and resumption applies. Finished
rows are recorded in `<out>/rows.json` with their settings and wall time; a rerun
with the same settings reuses them, and an interrupted comparison continues with
the first unfinished row.

Wall time is what the row costs on its own ("own"), and with what it needs first
("total": the features for the cached rows, plus K times the cost per view for the
views rows; features plus the dense head for the fine-tuning rows, which start
from it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import plots, runs
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadConfig, ViewsConfig, fingerprint
from pipeline.decisions import report_lines
from pipeline.errors import ConfigError
from pipeline.locks import exclusive

log = logging.getLogger(__name__)

ROWS = ("logistic", "dense", "finetune-top", "finetune-all", "scratch")
VIEWS_ROW = re.compile(r"^(logistic|dense)-views-([1-9][0-9]*)$")
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

    def head_for(self, name: str, views: int = 0) -> HeadConfig:
        """`views` explicit, so a plain row never picks up views another row cached."""
        return dataclasses.replace(self.head, head=name, views=views, runs_dir=str(self.out_dir / "runs"))

    def views_for(self, num_views: int) -> ViewsConfig:
        return ViewsConfig(num_views=num_views, augment=self.finetune.augment, seed=self.features.seed)

    def finetune_for(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self.finetune, runs_dir=str(self.out_dir / "runs"), **{"head_epochs": 0, **changes})


@dataclass(frozen=True)
class Comparison:
    rows: list[dict[str, Any]]
    table: str
    files: tuple[Path, ...]


def compare(
    features: FeaturesConfig,
    head: HeadConfig,
    finetune: FinetuneConfig,
    *,
    out_dir: Path,
    rows: Sequence[str] = ROWS,
    progress: bool = True,
) -> Comparison:
    """Runs (or reuses) each row in `rows` and writes the table, bar chart and curves to `out_dir`.

    One comparison writes `out_dir` at a time (`pipeline.locks.exclusive`, held to the
    end; the stages lock their own outputs inside it): a second one with the same
    folder waits, then reuses the rows the first one finished.
    """
    unknown = [r for r in rows if _runner(r) is None]
    if unknown or not rows:
        raise ConfigError(
            f"Unknown comparison rows {unknown or rows!r}. Expected some of: "
            f"{', '.join(ROW_RUNNERS)}, dense-views-K, logistic-views-K (K >= 1)."
        )
    out_dir = Path(out_dir)
    with exclusive(out_dir, what="comparison folder"):
        return _compare(features, head, finetune, out_dir, rows, progress)


def _compare(
    features: FeaturesConfig,
    head: HeadConfig,
    finetune: FinetuneConfig,
    out_dir: Path,
    rows: Sequence[str],
    progress: bool,
) -> Comparison:
    from pipeline.features.extract import resolve

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
            cached = {**_runner(name)(settings, done, progress), "identity": identity}
            done[name] = cached
            _save_rows(out_dir, done)
        results.append({"row": name, **cached})
    return _write_outputs(out_dir, results, settings)


# ------------------------------------------------------------------------ rows
def _features(settings: Settings, done: dict[str, Any], progress: bool, *, views: int = 0) -> dict[str, Any]:
    """Stage 1 for the comparison (with at least `views` views), timed once and remembered.

    Views are added to the file as rows ask for them; their cost is the file's own
    measure, seconds per view over every run that computed them.
    """
    from pipeline.features.extract import extract_features

    config = settings.features_for()
    identity = fingerprint({"features": config.to_dict(), "views": settings.views_for(0).identity()})
    record = done.get("_features")
    if not (record and record["identity"] == identity and Path(record["path"]).exists()):
        started = time.perf_counter()
        result = extract_features(config, progress=progress)
        record = {
            "path": str(result.path),
            "seconds": round(time.perf_counter() - started, 2),
            "identity": identity,
            "views": 0,
            "seconds_per_view": None,
        }
    if record.get("views", 0) < views:
        result = extract_features(config, views=settings.views_for(views), progress=progress)
        record = {**record, "views": result.num_views, "seconds_per_view": result.view_attrs["seconds_per_view"]}
    done["_features"] = record
    _save_rows(settings.out_dir, done)
    return record


def _cached_head(name: str, views: int = 0) -> Callable[..., dict[str, Any]]:
    def run(settings: Settings, done: dict[str, Any], progress: bool) -> dict[str, Any]:
        from pipeline.features.extract import resolve
        from pipeline.heads.train import train_head

        features = _features(settings, done, progress, views=views)
        started = time.perf_counter()
        run = train_head(
            Path(features["path"]), settings.head_for(name, views), expect=resolve(settings.features_for())[1]
        )
        own = time.perf_counter() - started
        head = run.head
        history = getattr(head, "history_", None) or {}
        prerequisite = features["seconds"] + (views * features["seconds_per_view"] if views else 0.0)
        return {
            "kind": f"{name} head on cached features" + (f" + {views} augmented views" if views else ""),
            "run_dir": str(run.run_dir),
            "validation": _accuracy(run.metrics, "validation"),
            "test": _accuracy(run.metrics, "test"),
            "own_seconds": round(own, 2),
            "total_seconds": round(own + prerequisite, 2),
            "trainable_parameters": head.parameter_count,
            "val_accuracy_curve": history.get("val_accuracy", []),
            "decisions": run.metrics.get("decisions"),
        }

    return run


def _unfrozen(at: dict[str, Any]) -> str:
    """How much of the backbone a fine-tuning row trains, in words for the table."""
    if at["index"] == 0:
        return f"fine-tune all {at['layers']} layers"
    return f"fine-tune the top {at['layers'] - at['index']} of {at['layers']} layers (from {at['layer']})"


def _finetuned(**changes: Any) -> Callable[..., dict[str, Any]]:
    def run(settings: Settings, done: dict[str, Any], progress: bool) -> dict[str, Any]:
        from pipeline.finetune.train import finetune

        scratch = changes.get("from_scratch", False)
        warm_start = not scratch and not changes.get("head_epochs")
        prerequisite = 0.0
        if warm_start:
            if done.get("dense", {}).get("identity") != _identity(settings, "dense"):
                done["dense"] = {
                    **ROW_RUNNERS["dense"](settings, done, progress),
                    "identity": _identity(settings, "dense"),
                }
                _save_rows(settings.out_dir, done)
            prerequisite = done["dense"]["total_seconds"]
        started = time.perf_counter()
        result = finetune(
            settings.features_for(scratch=scratch),
            settings.head_for("dense"),
            settings.finetune_for(**changes),
            progress=progress,
        )
        own = time.perf_counter() - started
        metrics = result.metrics
        curve = runs.history_column(result.run_dir, "val_accuracy")
        if changes.get("epochs") == 0:
            kind = (
                f"seed workflow: a fresh head, {changes['head_epochs']} epochs on augmented images "
                "through the frozen backbone"
            )
            parameters = metrics["parameters"]["frozen"]["trainable"]
        else:
            at = metrics["fine_tune_at"]
            kind = f"train all {at['layers']} layers from random weights" if scratch else _unfrozen(at)
            parameters = metrics["parameters"]["finetune"]["trainable"]
        return {
            "kind": kind,
            "run_dir": str(result.run_dir),
            "validation": _accuracy(metrics["after"], "validation"),
            "test": _accuracy(metrics["after"], "test"),
            "own_seconds": round(own, 2),
            "total_seconds": round(own + prerequisite, 2),
            "trainable_parameters": parameters,
            "val_accuracy_curve": curve,
            "decisions": metrics.get("decisions"),
        }

    return run


def _seed_workflow(settings: Settings, done: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Stage 3 with a fresh head and no fine-tuning, for as many epochs as the heads get."""
    return _finetuned(head_epochs=settings.head.epochs, epochs=0)(settings, done, progress)


ROW_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "logistic": _cached_head("logistic"),
    "dense": _cached_head("dense"),
    "finetune-top": _finetuned(fine_tune_at="blocks:1"),
    "finetune-all": _finetuned(fine_tune_at="all"),
    "scratch": _finetuned(fine_tune_at="all", from_scratch=True),
    "seed": _seed_workflow,
}


def _runner(name: str) -> Callable[..., dict[str, Any]] | None:
    match = VIEWS_ROW.match(name)
    if match:
        return _cached_head(match[1], int(match[2]))
    return ROW_RUNNERS.get(name)


def _identity(settings: Settings, name: str) -> str:
    """A digest of every setting that changes a row's result."""
    parts: dict[str, Any] = {"row": name, "features": settings.features_for(scratch=name == "scratch").to_dict()}
    match = VIEWS_ROW.match(name)
    if name in ("logistic", "dense") or match:
        views = int(match[2]) if match else 0
        parts["head"] = settings.head_for(match[1] if match else name, views).to_dict()
        if views:
            parts["views"] = settings.views_for(views).identity()
    else:
        parts["head"] = settings.head_for("dense").to_dict()
        parts["finetune"] = settings.finetune_for().to_dict()
    parts["decisions"] = _decisions_identity(settings)
    return fingerprint(parts)


def _decisions_identity(settings: Settings) -> str | None:
    """What the review decisions change (`pipeline.decisions`): a row reruns when they change."""
    from pipeline.audit.exclusion import planned_decisions
    from pipeline.decisions import decisions_fingerprint, effective
    from pipeline.features.extract import resolve

    head = settings.head_for("dense")
    _, decisions = planned_decisions(resolve(settings.features_for())[2], head)
    return decisions_fingerprint(decisions, test=head.decisions_test) if effective(decisions) else None


def _accuracy(metrics: dict[str, Any], split: str) -> float | None:
    return metrics[split]["accuracy"] if metrics.get(split) else None


def _load_rows(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / ROWS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_rows(out_dir: Path, rows: dict[str, Any]) -> None:
    runs.write_json(out_dir / ROWS_FILE, rows)


# --------------------------------------------------------------------- outputs
def _write_outputs(out_dir: Path, results: list[dict[str, Any]], settings: Settings) -> Comparison:
    table = comparison_table(results, settings)
    (out_dir / "comparison.md").write_text(table)
    (out_dir / "comparison.json").write_text(
        json.dumps(
            {
                "features": settings.features.to_dict(),
                "head": settings.head.to_dict(),
                "finetune": settings.finetune.to_dict(),
                "rows": results,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    bars = plots.comparison_bars(
        [r["row"] for r in results],
        [r["validation"] for r in results],
        [r["test"] for r in results],
        [r["total_seconds"] for r in results],
        out_dir / "comparison.png",
        title=f"{settings.features.data.name}, {settings.features.backbone}",
    )
    curves = plots.overlaid_curves(
        {r["row"]: r["val_accuracy_curve"] for r in results if r["val_accuracy_curve"]},
        out_dir / "learning_curves.png",
        ylabel="validation accuracy",
    )
    files = (out_dir / "comparison.md", out_dir / "comparison.json", bars, curves)
    return Comparison(rows=results, table=table, files=files)


def comparison_table(results: list[dict[str, Any]], settings: Settings) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    f = settings.features
    few = settings.head.train_per_class
    lines = [
        f"Comparison on {f.data.name}, {f.backbone} at {f.image_size} px"
        + (f", {few} train images per class" if few else "")
        + f"; heads: up to {settings.head.epochs} epochs; fine-tuning rows: "
        f"{settings.finetune.epochs} epochs, {settings.finetune.optimizer}.",
        "",
        "| row | what | validation acc | test acc | own s | total s | trainable params |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['kind']} | {fmt(r['validation'])} | {fmt(r['test'])} | "
            f"{r['own_seconds']:.1f} | {r['total_seconds']:.1f} | {r['trainable_parameters']:,} |"
        )
    decided = next((r["decisions"] for r in results if r.get("decisions")), None)
    return "\n".join(lines + report_lines(decided, None, None)) + "\n"
