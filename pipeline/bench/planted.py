"""Generated feature files for `make bench-audit`: clustered rows with duplicates and leaks planted at known pairs.

Rows are ReLU(z W + b + noise), z drawn around one of `clusters` centres of a 64-d
latent space: pooled CNN features have a low intrinsic dimension, and isotropic noise
in 1280-d has no meaningful neighbours to find. Class = cluster % classes; splits
80/10/10 train/validation/test. Planted: `planted` pairs inside train (a copy of a
train row over another train row) and as many leaks (a train row copied over a test
row), each copy the row plus 3% noise (cosine about 0.99, as a re-encoded photo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LATENT = 64
#: Rows generated per block: the generator holds one block, never the file.
BLOCK = 50_000


def _copies(rng, x: np.ndarray, rows: int, planted: int, n_train: int, n_val: int) -> dict[str, np.ndarray]:
    """(planted, 2) source/target rows of the duplicates inside train and of the leaks into test."""
    train = rng.permutation(n_train)
    leaks = rng.choice(np.arange(n_train + n_val, rows), size=planted, replace=False)
    return {
        "duplicates": np.stack([train[:planted], train[planted : 2 * planted]], axis=1),
        "leaks": np.stack([train[2 * planted : 3 * planted], leaks], axis=1),
    }


def generated_features(
    path: Path, rows: int, *, width: int = 1280, classes: int = 10, clusters: int = 1000, seed: int = 0
) -> tuple[Path, dict[str, Any]]:
    """Writes the feature file (float16) and returns it with the planted pairs as id pairs."""
    from pipeline.features.store import FORMAT_VERSION, write_features

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (clusters, LATENT)).astype(np.float32)
    w = (rng.normal(0, 1, (LATENT, width)) / np.sqrt(LATENT)).astype(np.float32)
    bias = rng.normal(0.3, 0.3, width).astype(np.float32)
    cluster = rng.integers(0, clusters, rows)
    labels = (cluster % classes).astype(np.int64)
    n_train, n_val = int(rows * 0.8), int(rows * 0.1)
    x = np.empty((rows, width), np.float16)
    for a in range(0, rows, BLOCK):
        b = min(rows, a + BLOCK)
        z = centres[cluster[a:b]] + 0.6 * rng.standard_normal((b - a, LATENT), dtype=np.float32)
        noise = 0.55 * rng.standard_normal((b - a, width), dtype=np.float32)
        x[a:b] = np.maximum(z @ w + bias + noise, 0)
    planted = max(20, rows // 1000)
    pairs = _copies(rng, x, rows, planted, n_train, n_val)
    for source, target in np.concatenate(list(pairs.values())):
        base = x[source].astype(np.float32)
        x[target] = np.maximum(base + 0.03 * base.std() * rng.standard_normal(width, dtype=np.float32), 0)
        labels[target] = labels[source]
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, rows)}
    names = [f"class{c}" for c in range(classes)]
    ids = np.array([f"{s}/{names[labels[r]]}/{r}.jpg" for s, (a, b) in bounds.items() for r in range(a, b)])
    splits = {
        split: (
            [
                (x[c:d], labels[c:d], np.arange(c - a, d - a), list(ids[c:d]))
                for c in range(a, b, BLOCK)
                for d in (min(c + BLOCK, b),)
            ],
            {"spec": f"generated:{split}", "num_inputs": b - a, "num_skipped": 0, "skipped": []},
        )
        for split, (a, b) in bounds.items()
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": {"dataset": "generated-clusters", "rows": rows, "width": width, "seed": seed},
        "class_names": names,
        "feature_dim": width,
        "config": {"data": {"dataset": "generated", "data_dir": None}},
        "dataset": "generated",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    written = write_features(path, attrs=attrs, splits=splits, feature_dim=width, dtype=np.float16)
    return written, {kind: [sorted((str(ids[i]), str(ids[j]))) for i, j in p] for kind, p in pairs.items()}
