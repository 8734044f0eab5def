"""One fine-tuning, resolved: its settings, the stage-2 run it starts from, its run directory.

A run's identity (its config.json) decides whether a finished run is current and
which `.partial-<digest>` folder a rerun resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import runs
from pipeline.config import FeaturesConfig, FinetuneConfig, HeadConfig, fingerprint, slugify
from pipeline.errors import CacheError, ConfigError
from pipeline.features.extract import resolve
from pipeline.heads.base import Head
from pipeline.heads.registry import load_head
from pipeline.locks import exclusive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRun:
    """A finished fine-tuning: its run directory and metrics.json; `up_to_date` when it was not retrained."""

    run_dir: Path
    metrics: dict[str, Any]
    up_to_date: bool = False

    def summary(self) -> str:
        m = self.metrics
        parts = ["finetune" + (" (up to date, not retrained)" if self.up_to_date else "")]
        for split in ("validation", "test"):
            if m["after"].get(split):
                before = m["before"][split]["accuracy"] if m["before"].get(split) else None
                change = f" (before {before:.4f})" if before is not None else ""
                parts.append(f"{split} accuracy {m['after'][split]['accuracy']:.4f}{change}")
        parts.append(f"{m['seconds_per_epoch']:.1f} s/epoch -> {self.run_dir}")
        return ", ".join(parts)

    def record(self) -> dict[str, Any]:
        """The result as JSON (`--json`): what `make bench` reads instead of the summary line."""
        return {
            "stage": "finetune",
            "run_dir": str(self.run_dir),
            "up_to_date": self.up_to_date,
            "metrics": self.metrics,
        }


@dataclass(frozen=True)
class Origin:
    """Where the head comes from: a stage-2 run, or none (warm-up or scratch)."""

    name: str
    run_dir: Path | None = None
    head: Head | None = None
    record: Mapping[str, Any] | None = None
    trained: str | None = None  # a fingerprint of its metrics.json: which training of that run
    trained_mtime: int | None = None  # st_mtime_ns of its metrics.json: the same for runs written before


@dataclass(frozen=True)
class Job:
    """One fine-tuning, resolved: its settings, where its head comes from, where it writes."""

    features: FeaturesConfig  # resolved: the image size filled in
    config: FinetuneConfig
    origin: Origin
    run_dir: Path
    identity: Mapping[str, Any]  # config.json of the run; a finished run with another is not current
    per_class: int | None  # few-shot: train on the stage-2 head's own examples per class
    subset_seed: int
    decisions: Path | None = None  # the review decisions applied to the images (`pipeline.decisions`)
    decisions_test: bool = False

    @property
    def work(self) -> Path:
        """Where training state and outputs gather; one per identity, so other settings never resume it."""
        return self.run_dir.with_name(f"{self.run_dir.name}.partial-{fingerprint(self.identity)}")


def finetune_run_dir(
    features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig, *, head_run: Path | None = None
) -> Path:
    """`runs/<stage-2 run>__ft-<at>`; without a stage-2 head, `<features>__<origin>__ft-<at>`."""
    _, _, path = resolve(features)
    few = f"__{head.train_per_class}-per-class" if head.train_per_class is not None else ""
    decided = _decisions_suffix(path, head)
    if config.from_scratch:
        base = f"{path.stem}__scratch{few}{decided}"
    elif config.head_epochs:
        base = f"{path.stem}__images{config.head_epochs}{few}{decided}"
    else:
        base = Path(head_run).name if head_run else runs.run_dir_for(path, head).name
    at = "frozen" if config.epochs == 0 else slugify(config.fine_tune_at.replace(":", ""))
    return Path(config.runs_dir) / f"{base}__ft-{at}"


def _decisions_suffix(features_path: Path, head: HeadConfig) -> str:
    """`__dec-<digest>` when review decisions change rows (as `runs.run_dir_for` names a stage-2 run)."""
    from pipeline.audit.exclusion import planned_decisions
    from pipeline.decisions import decisions_fingerprint, effective

    _, decisions = planned_decisions(features_path, head)
    return f"__dec-{decisions_fingerprint(decisions, test=head.decisions_test)}" if effective(decisions) else ""


def resolve_job(features: FeaturesConfig, head: HeadConfig, config: FinetuneConfig, head_run: Path | None) -> Job:
    """Checks the options, reads the stage-2 run to start from and names the run directory."""
    features, key, features_path = resolve(features)
    _check_options(features, config)
    origin = _origin(features, key, features_path, head, config, head_run)
    per_class, subset_seed = _few_shot_setting(origin, head)
    from pipeline.audit.exclusion import planned_decisions
    from pipeline.decisions import decisions_fingerprint, effective

    decisions_file, decisions = planned_decisions(features_path, head)
    decided = effective(decisions) and decisions_file is not None
    identity = {
        "features": features.to_dict(),
        "features_key": key,
        "finetune": config.to_dict(),
        "head_run": head_identity(origin),
        "train_per_class": per_class,
        "decisions": decisions_fingerprint(decisions, test=head.decisions_test) if decided else None,
    }
    run_dir = finetune_run_dir(features, head, config, head_run=origin.run_dir)
    return Job(
        features,
        config,
        origin,
        run_dir,
        identity,
        per_class,
        subset_seed,
        decisions=decisions_file if decided else None,
        decisions_test=head.decisions_test,
    )


def _few_shot_setting(origin: Origin, head: HeadConfig) -> tuple[int | None, int]:
    """(examples per class, seed) to train on: the stage-2 head's own, else `head`'s."""
    chosen = origin.record["head"] if origin.record else head.to_dict()
    return chosen.get("train_per_class"), chosen.get("seed", 0)


def _check_options(features: FeaturesConfig, config: FinetuneConfig) -> None:
    if features.num_shards > 1:
        raise ConfigError(
            "Fine-tuning uses the whole dataset: drop SHARD/NUM_SHARDS "
            f"(received shard {features.shard_index} of {features.num_shards})."
        )
    if config.from_scratch:
        if features.weights != "none":
            raise ConfigError(
                f"FROM_SCRATCH=1 trains from random weights: set WEIGHTS=none. Received: WEIGHTS={features.weights}."
            )
        if config.head_epochs:
            raise ConfigError("FROM_SCRATCH=1 trains everything at once: set HEAD_EPOCHS=0.")
    elif features.weights == "none":
        raise ConfigError(
            f"Fine-tuning needs a pretrained backbone, but WEIGHTS=none makes {features.backbone} random. "
            "Set WEIGHTS=imagenet or WEIGHTS=/path/to/weights.h5 (or FROM_SCRATCH=1 to train from scratch)."
        )


def _origin(
    features: FeaturesConfig,
    key: Mapping[str, Any],
    features_path: Path,
    head: HeadConfig,
    config: FinetuneConfig,
    head_run: Path | None,
) -> Origin:
    """The stage-2 run to warm-start from, checked against the backbone asked for."""
    if config.from_scratch:
        return Origin("scratch")
    if not config.warm_starts:
        return Origin(f"a fresh head trained {config.head_epochs} epochs on images")
    run_dir = Path(head_run) if head_run else runs.run_dir_for(features_path, head)
    if not run_dir.parent.is_dir():
        return _read_origin(run_dir, key)  # nothing there to wait for: the error says what to do
    with exclusive(run_dir, what="run directory"):  # not while `make head` replaces it
        return _read_origin(run_dir, key)


def _read_origin(run_dir: Path, key: Mapping[str, Any]) -> Origin:
    found = runs.read_run(run_dir)
    if found is None:
        raise CacheError(
            f"No stage-2 head to warm-start from in {run_dir}. Train one first with `make head HEAD=dense` "
            "and the same variables, or pass HEAD_EPOCHS=N to train a head on images with the backbone "
            "frozen for N epochs first."
        )
    record = found.config
    stored = record["features_key"]
    wanted = {
        "backbone": key["backbone"],
        "image_size": key["image_size"],
        "pooling": key["pooling"],
        "weights": key["weights"],
        "dataset": key["dataset"],
    }
    differs = [f"{k}: head {stored.get(k)!r}, asked {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if differs:
        raise CacheError(
            f"The head in {run_dir} was trained on other features than this fine-tuning asks for "
            f"({'; '.join(differs)}). Use the same BACKBONE/IMAGE_SIZE/POOLING/WEIGHTS/data as its "
            "`make head`, or train a head for these settings."
        )
    return Origin(
        run_dir.name,
        run_dir=run_dir,
        head=load_head(run_dir),
        record=record,
        trained=fingerprint(found.metrics),
        trained_mtime=(run_dir / runs.METRICS).stat().st_mtime_ns,
    )


def head_identity(origin: Origin, *, trained: str | int | None = None) -> Any:
    """The stage-2 run a fine-tuning starts from: its place, its head config and which training of it."""
    if origin.run_dir is None:
        return origin.name
    return {
        "run": str(origin.run_dir),
        "head": origin.record["head"],
        "trained": origin.trained if trained is None else trained,
    }


def finished(job: Job) -> FinetuneRun | None:
    """The finished run of `job` if its config.json holds the job's identity.

    Runs written before the stage-2 run was identified by a fingerprint of its
    metrics.json hold that file's modification time (an int) instead; they stay
    current while it is unchanged.
    """
    found = runs.read_run(job.run_dir)
    if found is None:
        return None
    identity = job.identity
    stored = found.config.get("head_run")
    if isinstance(stored, Mapping) and isinstance(stored.get("trained"), int):
        identity = {**identity, "head_run": head_identity(job.origin, trained=job.origin.trained_mtime)}
    if not found.matches(identity):
        return None
    return FinetuneRun(run_dir=job.run_dir, metrics=found.metrics, up_to_date=True)
