"""Generated data for the scale benchmarks and the tests: feature files and image folders of any size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.features.store import FORMAT_VERSION, write_features

#: Rows generated at once: the unit of the generator's seeds, so files do not depend on memory.
_CHUNK = 16384


def synthetic_rows(
    rows: int, *, dim: int, classes: int, seed: int, noise_seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (features float32 (n, dim), labels int64 (n,)) of a generated split of `rows` rows.

    Class c's features are its mean plus unit Gaussian noise; the means sit about 3
    noise units apart, so heads reach high but not perfect accuracy, as on real
    features. The rows depend only on (seed, noise_seed, rows).
    """
    means = np.random.default_rng([seed, 0]).normal(0, 3 / np.sqrt(2 * dim), (classes, dim)).astype(np.float32)
    for a in range(0, rows, _CHUNK):
        n = min(rows, a + _CHUNK) - a
        rng = np.random.default_rng([seed, noise_seed + 1, a])
        labels = rng.integers(classes, size=n)
        yield means[labels] + rng.standard_normal((n, dim), dtype=np.float32), labels.astype(np.int64)


def write_synthetic_features(
    path: Path,
    *,
    rows: int,
    dim: int = 1280,
    classes: int = 2,
    views: int = 0,
    val_rows: int | None = None,
    seed: int = 0,
) -> Path:
    """A finished feature file of generated rows (train `rows`, validation and test `val_rows` each).

    Augmented view v of a train row is the row plus N(0, 0.3) noise. Rows are
    written chunk by chunk, so memory stays flat however many rows are asked.
    """
    val_rows = max(100, rows // 10) if val_rows is None else val_rows
    names = [f"class_{c}" for c in range(classes)]
    key = {"dataset": "synthetic", "rows": rows, "dim": dim, "classes": classes, "seed": seed}

    def chunks(n: int, noise_seed: int, prefix: str):
        done = 0
        for features, labels in synthetic_rows(n, dim=dim, classes=classes, seed=seed, noise_seed=noise_seed):
            index = np.arange(done, done + len(labels), dtype=np.int64)
            yield features, labels, index, [f"{prefix}-{i}" for i in index]
            done += len(labels)

    def view_chunks():
        for v in range(views):
            done = 0
            for features, labels in synthetic_rows(rows, dim=dim, classes=classes, seed=seed, noise_seed=0):
                noise = np.random.default_rng([seed, 100 + v, done]).normal(0, 0.3, features.shape)
                index = np.arange(done, done + len(labels), dtype=np.int64)
                yield (features + noise.astype(np.float32), labels, index, np.full(len(labels), v, np.int64))
                done += len(labels)

    splits = {
        name: (
            chunks(n, noise_seed, name),
            {"spec": f"synthetic:{name}", "num_inputs": n, "num_skipped": 0, "skipped": []},
        )
        for name, n, noise_seed in (("train", rows, 0), ("validation", val_rows, 1), ("test", val_rows, 2))
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "config": {"synthetic": key},
        "class_names": names,
        "feature_dim": dim,
        "dtype": "float32",
        "dataset": "synthetic",
        "num_skipped": 0,
    }
    view_attrs = None
    if views:
        view_attrs = (
            view_chunks(),
            {
                "num_views": views,
                "seed": seed,
                "augment": {"noise": 0.3},
                "config": {"synthetic": True},
                "seconds": 0.0,
                "seconds_per_view": 0.0,
            },
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_features(Path(path), attrs=attrs, splits=splits, feature_dim=dim, dtype=np.float32, views=view_attrs)


def write_images(root: Path, count: int, *, size: int = 48, seed: int = 0) -> Path:
    """`count` small JPEGs in two class folders (a flat layout): noise around a class colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"cat": (200, 60, 60), "dog": (60, 60, 200)}
    for i in range(count):
        name = ("cat", "dog")[i % 2]
        path = root / name / f"{name}.{i // 2}.jpg"
        if path.exists():
            continue
        pixels = np.clip(np.asarray(colours[name]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root
