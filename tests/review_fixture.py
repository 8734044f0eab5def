"""A real audit of a tiny image folder, built without TensorFlow, for the review tests (fixtures in conftest).

The images are small generated JPEGs in train/validation/test class folders; their
"features" are generated too (one mean per class, noise), with the findings planted
where the truth is known: byte-identical copies (a train/test leak, a copy inside
train), a near copy across splits, two photos filed under the wrong class, and one
photo unlike any other. `pipeline.audit.audit_features` then writes a genuine
audit.json and contact sheets, so the tests read the format `make audit` writes,
not a hand-made imitation of it.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")
COLORS = {"cat": (200, 60, 60), "dog": (60, 60, 200), "fox": (60, 200, 60)}
PER_SPLIT = {"train": 10, "validation": 4, "test": 4}


def write_image(path: Path, color, seed: int, size=(48, 40)) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(color, float) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)


#: A feature file named as `make features` names one: the dataset, "generated", comes first.
FEATURES = "generated__tiny__none__32px__avg__0123456789.h5"


def build_audit(root: Path) -> Path:
    """Writes root/images, root/<FEATURES> and root/audit/<stem>/; returns the audit folder."""
    from pipeline.audit.findings import audit_features
    from pipeline.config import AuditConfig
    from pipeline.features.store import FORMAT_VERSION, write_features

    images = root / "images"
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.0, (len(CLASSES), 64))
    rows: dict[str, list[tuple[np.ndarray, int, str]]] = {s: [] for s in PER_SPLIT}

    def add(split: str, label: str, name: str, vector: np.ndarray, color=None, copy_of: str | None = None) -> str:
        rel = f"{split}/{label}/{name}"
        if copy_of:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(images / copy_of, images / rel)
        else:
            write_image(images / rel, color or COLORS[label], zlib.crc32(rel.encode()))
        rows[split].append((vector, CLASSES.index(label), rel))
        return rel

    vectors = {}
    for split, n in PER_SPLIT.items():
        for c, label in enumerate(CLASSES):
            for i in range(n):
                v = np.maximum(means[c] + rng.normal(0, 1.0, 64), 0)
                vectors[add(split, label, f"{label}.{i}.jpg", v)] = v
    # Exact copies: a leak train -> test, and a copy inside train.
    add("test", "cat", "copy-of-cat.0.jpg", vectors["train/cat/cat.0.jpg"], copy_of="train/cat/cat.0.jpg")
    add("train", "dog", "dog.1-copy.jpg", vectors["train/dog/dog.1.jpg"], copy_of="train/dog/dog.1.jpg")
    # A near copy across splits (re-encoded, brighter): other bytes, nearly the same features.
    add("validation", "fox", "fox-again.jpg", vectors["train/fox/fox.3.jpg"] * 1.02 + rng.normal(0, 0.01, 64))
    # Photos filed under the wrong class: cat features and colours in dog/ and fox/.
    for label in ("dog", "fox"):
        add("train", label, "actually-a-cat.jpg", np.maximum(means[0] + rng.normal(0, 0.5, 64), 0), COLORS["cat"])
    # One photo like no other.
    add("train", "cat", "odd.jpg", np.maximum(rng.normal(0, 3.0, 64), 0) * 4, (250, 250, 250))

    stored = {
        split: (
            [
                (
                    np.stack([r[0] for r in mine]).astype(np.float32),
                    np.array([r[1] for r in mine], np.int64),
                    np.arange(len(mine)),
                    [r[2] for r in mine],
                )
            ],
            {"spec": f"folder:{split}", "num_inputs": len(mine), "num_skipped": 0, "skipped": []},
        )
        for split, mine in rows.items()
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": {"dataset": "generated", "seed": 0},
        "class_names": list(CLASSES),
        "config": {"data": {"dataset": None, "data_dir": str(images)}},
        "feature_dim": 64,
    }
    features = write_features(root / FEATURES, attrs=attrs, splits=stored, feature_dim=64, dtype=np.float32)
    result = audit_features(features, AuditConfig(audit_dir=str(root / "audit"), top=2, folds=3, C=1.0))
    return result.out_dir
