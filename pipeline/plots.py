"""Figures people would rather look at than read, written straight to PNG.

Uses matplotlib's object API (`Figure`) rather than pyplot: no global figure state,
no display needed, nothing shown mid-run.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

#: zlib level 1 instead of Pillow's 6: a photo grid's PNG encodes ~3x faster for ~15% more bytes.
_FAST_PNG = {"compress_level": 1}
_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


def save(figure: Figure, path: Path, **kwargs) -> Path:
    """`figure.savefig(path, **kwargs)`, with one log line instead of matplotlib's warning per
    character when a label (a class named in Chinese, or with an emoji) has characters the
    font lacks: the plot shows them as boxes, the report and the predictions keep them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message="Glyph .* missing from font")
        figure.savefig(path, **kwargs)
    missing = sorted({chr(int(m.group(1))) for w in caught if (m := _MISSING_GLYPH.search(str(w.message)))})
    for other in (w for w in caught if not _MISSING_GLYPH.search(str(w.message))):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if missing:
        log.warning(
            "%s: the plot font has no %s, shown as boxes (install a font that has them, such as Noto).",
            Path(path).name,
            ", ".join(missing),
        )
    return path


def learning_curves(
    history: Mapping[str, Sequence[float]],
    path: Path,
    *,
    marker: int | None = None,
    marker_label: str = "start fine-tuning",
) -> Path:
    """Accuracy and loss per epoch, training and validation (the tutorials' figure).

    `marker` draws a vertical line after that many epochs, where a later phase begins.
    """
    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for prefix, label in (("", "training"), ("val_", "validation")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(epochs[: len(values)], values, marker="o", markersize=3, label=f"{label} {metric}")
        if marker is not None:
            ax.axvline(marker + 0.5, color="grey", linestyle="--", label=marker_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("Training and validation accuracy")
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    save(figure, path, dpi=100)
    return path


#: Classes a confusion matrix shows at most, each cell with its count: the figure grows with
#: the square of the classes (hundreds would take seconds and gigabytes), and beyond this no one reads it.
MATRIX_CLASSES = 30


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, *, title: str) -> Path:
    """Counts with row-normalized shading: rows are true classes, columns predictions.

    With more than `MATRIX_CLASSES` classes, the ones most often mistaken (their row's
    and column's errors) are shown, in their order, and the title says so; a shade is
    still the fraction of all of its true class's images. The full matrix stays in the
    run's metrics.
    """
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    if len(class_names) > MATRIX_CLASSES:
        shown = most_mistaken(counts, MATRIX_CLASSES)
        title = f"{title}\nthe {MATRIX_CLASSES} of {len(class_names)} classes with the most errors"
        counts, rates = counts[np.ix_(shown, shown)], rates[np.ix_(shown, shown)]
        class_names = [class_names[i] for i in shown]
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    for i, j in np.ndindex(counts.shape):
        ax.text(
            j,
            i,
            str(counts[i, j]),
            ha="center",
            va="center",
            color="white" if rates[i, j] > 0.5 else "black",
            fontsize=8,
        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save(figure, path, dpi=100)
    return path


def most_mistaken(counts: np.ndarray, limit: int) -> np.ndarray:
    """Sorted indices of the `limit` classes in the most errors, as true class or as prediction."""
    errors = counts.sum(axis=0) + counts.sum(axis=1) - 2 * np.diag(counts)
    return np.sort(np.argsort(-errors, kind="stable")[:limit])


def top_losses(
    images: Sequence[np.ndarray],
    true: Sequence[str],
    predicted: Sequence[str],
    p_predicted: Sequence[float],
    p_true: Sequence[float],
    losses: Sequence[float],
    path: Path,
    *,
    title: str,
) -> Path:
    """The images the model gets most wrong or is least sure of (fastai's `plot_top_losses`).

    Each tile: predicted label and its probability, true label and its probability,
    the loss (-log p(true)); mistakes in red. Images come highest loss first.
    """
    columns = min(4, max(1, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    # One picture of all the tiles, drawn at its own pixel size (no axes: 16 of them with
    # their ticks and constrained layout cost more than the drawing), the titles as figure
    # text. Each image is centred in a `side`-pixel square under its 3-line title.
    dpi = 100
    side = max(160, max((max(np.shape(i)[:2]) for i in images), default=0))
    gap, title_h, top = 15, 55, 45
    cell_w, cell_h = side + 2 * gap, title_h + side + gap
    width, height = columns * cell_w, top + rows * cell_h
    canvas = np.full((height, width, 3), 255, np.uint8)
    figure = Figure(figsize=(width / dpi, height / dpi))
    for n, (image, t, p, pp, pt, loss) in enumerate(zip(images, true, predicted, p_predicted, p_true, losses)):
        image = np.asarray(image).astype(np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        h, w = image.shape[:2]
        x0 = (n % columns) * cell_w + gap + (side - w) // 2
        y0 = top + (n // columns) * cell_h + title_h + (side - h) // 2
        canvas[y0 : y0 + h, x0 : x0 + w] = image[..., :3]
        figure.text(
            (x0 + w / 2) / width,
            1 - (y0 - 4) / height,
            f"pred: {p} ({pp:.2f})\ntrue: {t} ({pt:.2f})\nloss {loss:.2f}",
            fontsize=9,
            ha="center",
            va="bottom",
            color="black" if p == t else "red",
        )
    figure.figimage(canvas, origin="upper")
    figure.suptitle(title, y=1 - 12 / height, va="top")
    save(figure, path, dpi=dpi, pil_kwargs=_FAST_PNG)
    return path


def contact_sheet(
    groups: Sequence[Sequence[np.ndarray | None]],
    captions: Sequence[str],
    path: Path,
    *,
    title: str,
    colors: Sequence[str] | None = None,
) -> Path:
    """Findings as thumbnails: each group (a duplicate pair, or one image) side by side,
    one caption under it; an image that could not be read is a grey tile.

    Groups are laid out on rows of about eight images, so pairs come four to a row.
    """
    width = max([len(g) for g in groups] or [1])
    per_row = min(max(1, 8 // width) if width > 1 else 6, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / per_row))
    figure = Figure(figsize=(max(7.0, 2.3 * per_row * width), 2.9 * rows + 0.6), layout="constrained")
    grid = figure.add_gridspec(rows, per_row)
    if not groups:
        figure.text(0.5, 0.5, "no findings", ha="center", va="center", fontsize=14)
    for g, (group, caption) in enumerate(zip(groups, captions)):
        cell = grid[g // per_row, g % per_row].subgridspec(1, width, wspace=0.02)
        for m in range(width):
            ax = figure.add_subplot(cell[0, m])
            ax.axis("off")
            image = group[m] if m < len(group) else None
            if m < len(group):
                if image is None:
                    ax.imshow(np.full((8, 8, 3), 200, np.uint8))
                    ax.text(4, 4, "not readable", ha="center", va="center", fontsize=7)
                else:
                    ax.imshow(np.asarray(image).astype(np.uint8))
            if m == 0:
                ax.set_title(caption, fontsize=7, loc="left", color=(colors[g] if colors is not None else "black"))
    figure.suptitle(title)
    save(figure, path, dpi=100)
    return path


def comparison_bars(
    names: Sequence[str],
    validation: Sequence[float | None],
    test: Sequence[float | None],
    seconds: Sequence[float],
    path: Path,
    *,
    title: str,
) -> Path:
    """Accuracy per approach (validation and test bars) beside its wall time (log scale)."""
    figure = Figure(figsize=(max(7.0, 1.6 * len(names) + 3), 4.5), layout="constrained")
    acc_ax, time_ax = figure.subplots(1, 2, width_ratios=[3, 2])
    x = np.arange(len(names))
    for offset, values, label in ((-0.2, validation, "validation"), (0.2, test, "test")):
        heights = [np.nan if v is None else v for v in values]
        if not all(np.isnan(heights)):
            bars = acc_ax.bar(x + offset, heights, width=0.4, label=label)
            acc_ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    acc_ax.set_xticks(x, names, rotation=20, ha="right")
    acc_ax.set_ylim(0, 1.08)
    acc_ax.set_ylabel("accuracy")
    acc_ax.legend(loc="lower right")
    acc_ax.grid(axis="y", alpha=0.3)
    bars = time_ax.barh(x, seconds, color="grey")
    time_ax.bar_label(bars, fmt="%.0f s", fontsize=7, padding=2)
    time_ax.set_yticks(x, names)
    time_ax.invert_yaxis()
    time_ax.set_xscale("log")
    time_ax.set_xlabel("wall s incl. prerequisites (log)")
    figure.suptitle(title)
    save(figure, path, dpi=100)
    return path


def overlaid_curves(curves: Mapping[str, Sequence[float]], path: Path, *, ylabel: str) -> Path:
    """One line per approach, epoch on x: how fast each one gets where."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    save(figure, path, dpi=100)
    return path
