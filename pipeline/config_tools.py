"""Option sections of the tools around the stages: review decisions, the review page and `make choose`.

Declared like the stages' own sections (`pipeline.config`), which lists them in `SECTIONS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.options import derived, option


@dataclass(frozen=True)
class DecisionsConfig:
    """Where audits and review decisions live, and which decisions training applies.

    `audit_dir` holds one folder per audited feature file and one decisions file per
    dataset (`pipeline.decisions`). `decisions` is a decisions file, `none`, or unset
    for the dataset's own file when there is one; `decisions_test` applies decisions
    on test images too (the report then gives the test score with and without them).
    """

    audit_dir: str = option(
        "audit", "audits go to AUDIT_DIR/<feature file stem>/, decisions to AUDIT_DIR/<dataset>.decisions.csv"
    )
    decisions: str | None = option(
        None, "review decisions to train with: a file, none, or unset for AUDIT_DIR/<dataset>.decisions.csv if present"
    )
    decisions_test: bool = option(False, "also apply decisions on test images (reports test accuracy with and without)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReviewConfig:
    """`make review`: the page over an audit. `audit_dir` may name one audit folder or
    the folder of audits (the latest one is served)."""

    port: int = option(8765, "make review: port on 127.0.0.1 (0: any free one)")
    audit_dir: str = derived("audit_dir", "audit")
    decisions: str | None = derived("decisions", None)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535. Received: PORT={self.port}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChooseConfig:
    """`make choose`: which backbone for this data, at what cost (`pipeline.choose`).

    Each of `backbones` extracts features of a seeded, stratified sample (`per_class`
    train and at most as many validation images per class) and fits the logistic probe.
    `weights` maps backbones to their weights (NAME=PATH,...; others use WEIGHTS). The
    recommendation is the fastest backbone within `tolerance` accuracy points of the best.
    """

    backbones: str = option("mobilenet_v2,mobilenet_075", "make choose: backbones to compare, comma-separated")
    per_class: int = option(200, "make choose: sampled train images per class (validation: as many, at most)")
    weights: str | None = option(
        None, "make choose: per-backbone weights NAME=PATH,... (others: WEIGHTS)", name="choose_weights"
    )
    tolerance: float = option(
        0.5, "make choose: recommend the fastest within this many accuracy points of the best", name="choose_tolerance"
    )
    out_dir: str = option("choose", "make choose: results go to CHOOSE_DIR/<data>/", name="choose_dir")

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError(f"backbones must name at least one backbone. Received: BACKBONES={self.backbones!r}.")
        if self.per_class < 2:
            raise ConfigError(f"per_class must be >= 2. Received: PER_CLASS={self.per_class}.")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0. Received: CHOOSE_TOLERANCE={self.tolerance}.")
        self.weights_of()

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in self.backbones.split(",") if n.strip()]

    def weights_of(self) -> dict[str, str]:
        """CHOOSE_WEIGHTS as {backbone: weights}; a backbone not in BACKBONES is an error, not ignored."""
        pairs = [p.strip().partition("=") for p in (self.weights or "").split(",") if p.strip()]
        bad = [f"{n}{s}{v}" for n, s, v in pairs if not s or not v or n.strip() not in self.names]
        if bad:
            raise ConfigError(
                f"CHOOSE_WEIGHTS must be NAME=PATH pairs for backbones of BACKBONES ({self.backbones}). "
                f"Received: {', '.join(bad)}."
            )
        return {n.strip(): v.strip() for n, _, v in pairs}
