"""`make bench-audit`: the audit's seconds and memory at scale, and the duplicate threshold's calibration.

The audit of generated rows must stay out of O(N**2) memory; `calibrate_duplicates` sets
altered copies of real photos against the distinct photos of a feature file, so the
duplicate threshold is a measured one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.bench.measure import machine, run_python
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: Cosine thresholds at which the calibration counts recall and distinct pairs.
THRESHOLDS = (0.80, 0.82, 0.84, 0.85, 0.86, 0.88, 0.90)
#: Rows whose mean cosine distance makes an outlier score, as the audit's default.
NEIGHBOURS = 10


def _alterations() -> dict[str, Callable]:
    """Alterations planted by `calibrate_duplicates`: each makes an altered copy of a photo (and its JPEG quality)."""
    from PIL import Image, ImageOps

    def crop(image, fraction=0.05):
        w, h = image.size
        return image.crop((round(w * fraction), round(h * fraction), w, h))

    return {
        "jpeg-q30": lambda image: (image, 30),
        "resize-90%": lambda image: (
            image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BILINEAR),
            95,
        ),
        "crop-5%": lambda image: (crop(image), 95),
        "flip": lambda image: (ImageOps.mirror(image), 95),
    }


def _write_altered(root: Path, ids: Sequence[str], chosen, work_dir: Path) -> dict[str, list[Path]]:
    """Every alteration of each chosen photo, as files under `work_dir/<alteration>/`."""
    from PIL import Image

    files: dict[str, list[Path]] = {}
    for name, alter in _alterations().items():
        folder = Path(work_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        files[name] = []
        for r in chosen:
            with Image.open(root / ids[r]) as image:
                altered, quality = alter(image.convert("RGB"))
            target = folder / f"{r}.jpg"
            altered.save(target, quality=quality)
            files[name].append(target)
    return files


def _write_off_distribution(folder: Path, rng) -> list[Path]:
    """Five uniform colours and five noise images: what an outlier score should rank first."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, color in enumerate([(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (30, 60, 200)]):
        Image.new("RGB", (320, 240), color).save(folder / f"uniform-{i}.jpg", quality=95)
        paths.append(folder / f"uniform-{i}.jpg")
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(folder / f"noise-{i}.png")
        paths.append(folder / f"noise-{i}.png")
    return paths


def _extractor_of(config) -> Callable:
    """Image files -> features, with the feature file's own backbone and settings."""
    import numpy as np

    from pipeline.features.extractor import build_extractor
    from pipeline.features.forward import compiled_forward
    from pipeline.images import decode_and_resize

    model = build_extractor(
        config.backbone, image_size=config.image_size, weights=config.weights_arg, pooling=config.pooling
    )
    forward = compiled_forward(model, config.image_size, config.batch_size)

    def features_of(paths: Sequence[Path]) -> np.ndarray:
        import tensorflow as tf

        out = []
        for start in range(0, len(paths), 32):
            images = [decode_and_resize(tf.io.read_file(str(p)), config.image_size) for p in paths[start : start + 32]]
            out.append(np.asarray(forward(tf.stack(images))))
        return np.concatenate(out)

    return features_of


def _planted_recall(originals, copies: dict, unit: Callable, thresholds: Sequence[float]) -> dict[str, Any]:
    """Per alteration: the cosine of each copy to its original, and the share found at each threshold."""
    import numpy as np

    planted = {}
    for name, x in copies.items():
        sims = np.sum(originals * unit(x), axis=1)
        planted[name] = {
            "min": round(float(sims.min()), 4),
            "p01": round(float(np.quantile(sims, 0.01)), 4),
            "median": round(float(np.median(sims)), 4),
            "recall": {str(t): round(float((sims >= t).mean()), 4) for t in thresholds},
        }
    return planted


def _similarity_figures(rows, units, planted, odd, odd_units, thresholds) -> dict[str, Any]:
    """Planted copies against the file's distinct pairs, and the off-distribution images' outlier scores."""
    import numpy as np

    sim = units @ units.T
    np.fill_diagonal(sim, -np.inf)
    own = 1 - np.sort(sim, axis=1)[:, -NEIGHBOURS:].mean(axis=1)
    planted_odd = 1 - np.sort(odd_units @ units.T, axis=1)[:, -NEIGHBOURS:].mean(axis=1)
    upper = np.triu_indices(len(units), 1)
    values = sim[upper]
    same = rows.labels[upper[0]] == rows.labels[upper[1]]
    nearest = sim.max(axis=1)
    return {
        "planted": planted,
        "distinct_pairs": int(len(values)),
        "pairs_above": {str(t): int((values >= t).sum()) for t in thresholds},
        "same_class_pairs_above": {str(t): int((values[same] >= t).sum()) for t in thresholds},
        "nearest_other_quantiles": {
            q: round(float(np.quantile(nearest, float(q))), 4) for q in ("0.5", "0.99", "0.999")
        },
        "off_distribution": [
            {"image": p.name, "score": round(float(d), 4), "rank": int((own > d).sum()) + 1}
            for p, d in zip(odd, planted_odd)
        ],
        "own_score_max": round(float(own.max()), 4),
        "top_pairs": [
            {"ids": [str(rows.ids[upper[0][t]]), str(rows.ids[upper[1][t]])], "cosine": round(float(values[t]), 4)}
            for t in np.argsort(-values)[:10]
        ],
    }


def _image_folder_config(features_path: Path, cached):
    from pipeline.config import FeaturesConfig

    config = FeaturesConfig.from_dict(cached.config)
    if not config.data.data_dir:
        raise ConfigError(
            "Calibration plants altered copies of image files: it needs features of an image folder "
            f"(DATA_DIR). Received: {features_path} of tfds {config.data.dataset!r}."
        )
    return config


def calibrate_duplicates(
    features_path: Path, *, work_dir: Path, count: int = 300, seed: int = 0, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, Any]:
    """Cosine similarity of planted altered copies against that of distinct photos.

    `count` seeded photos of the feature file's image folder are altered
    (`_alterations`: re-encoded at JPEG quality 30, resized to 90%, 5% cropped off
    two edges, mirrored) and run through the file's own backbone; each copy's
    similarity to its original is set against every pair of distinct photos in the
    file, with L2-normalised features as the audit uses them ("raw") and, for
    comparison, centred on the mean row first ("centred"). Off-distribution images
    (uniform colours, noise) are planted too: `off_distribution` gives their outlier
    score (mean cosine distance to the 10 nearest rows of the file) and its rank
    among the file's own rows.
    """
    import numpy as np

    from pipeline.audit.rows import stack_splits
    from pipeline.features.store import read_features

    cached = read_features(features_path)
    config = _image_folder_config(features_path, cached)
    root, rows = Path(config.data.data_dir), stack_splits(cached)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(rows), size=min(count, len(rows)), replace=False))
    files = _write_altered(root, rows.ids, chosen, work_dir)
    features_of = _extractor_of(config)
    again = features_of([root / rows.ids[r] for r in chosen])
    copies = {name: features_of(paths) for name, paths in files.items()}
    odd = _write_off_distribution(Path(work_dir) / "off-distribution", rng)
    odd_features = features_of(odd)
    result: dict[str, Any] = {
        "features": str(features_path),
        "planted": int(len(chosen)),
        "seed": seed,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "weights": config.weights,
        "reextracted_max_abs_diff": float(np.abs(again - rows.features[chosen]).max()),
        "thresholds": list(thresholds),
    }
    mean = rows.features.mean(axis=0)
    for centre, label in ((True, "centred"), (False, "raw")):

        def unit(x: np.ndarray, centre: bool = centre) -> np.ndarray:
            x = x - mean if centre else x
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        units = unit(rows.features)
        planted = _planted_recall(units[chosen], copies, unit, thresholds)
        result[label] = _similarity_figures(rows, units, planted, odd, unit(odd_features), thresholds)
    return result


def generated_features(path: Path, rows: int, *, width: int = 1280, classes: int = 10, seed: int = 0) -> Path:
    """A feature file of `rows` generated rows (80/10/10 train/validation/test) for `bench_audit`.

    Rows are ReLU(class mean + noise), non-negative like pooled CNN features; the class
    means differ little from a shared mean, so a linear probe confuses a few percent of
    rows at a few thousand rows, as on real data.
    """
    import numpy as np

    from pipeline.features.store import FORMAT_VERSION, write_features

    rng = np.random.default_rng(seed)
    means = (rng.normal(0.3, 0.3, width) + rng.normal(0, 0.07, (classes, width))).astype(np.float32)
    sizes = {"train": int(rows * 0.8), "validation": int(rows * 0.1)}
    sizes["test"] = rows - sum(sizes.values())
    names = [f"class{c}" for c in range(classes)]
    key = {"dataset": "generated", "rows": rows, "width": width, "seed": seed}
    splits = {}
    for split, n in sizes.items():
        labels = np.arange(n) % classes
        chunks = []
        for start in range(0, n, 8192):
            y = labels[start : start + 8192]
            x = np.maximum(means[y] + rng.normal(0, 0.6, (len(y), width)).astype(np.float32), 0)
            ids = [f"{split}/{names[c]}/{start + i}.jpg" for i, c in enumerate(y)]
            chunks.append((x, y.astype(np.int64), np.arange(start, start + len(y)), ids))
        splits[split] = (chunks, {"spec": f"generated:{split}", "num_inputs": n, "num_skipped": 0, "skipped": []})
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "class_names": names,
        "feature_dim": width,
        "config": {"data": {"dataset": "generated", "data_dir": None}},
        "dataset": "generated",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_features(path, attrs=attrs, splits=splits, feature_dim=width, dtype=np.float32)


_AUDIT_CHILD = """
import json, sys
from pathlib import Path
from pipeline.audit.findings import audit_features
from pipeline.config import AuditConfig
result = audit_features(Path(sys.argv[1]), AuditConfig(audit_dir=sys.argv[2], top=0, C=float(sys.argv[3])))
print(json.dumps({"seconds": result.seconds, "counts": result.counts}))
"""


def bench_audit(
    *, work_dir: Path, sizes: Sequence[int] = (10_000, 100_000), width: int = 1280, C: float = 0.01
) -> dict[str, Any]:
    """Seconds (per step) and peak resident memory of an audit of generated rows.

    Each size runs in a fresh process (`python -c`, the audit itself without contact
    sheets), so its peak memory is its own. The probe's C is fixed (the validation
    sweep is `make head`'s cost, measured by `make bench-head`).
    """
    runs = []
    for size in sizes:
        path = generated_features(Path(work_dir) / f"generated-{size}.h5", size, width=width)
        args = (str(path), str(Path(work_dir) / "audit"), str(C))
        child = run_python(_AUDIT_CHILD, *args, what=f"The audit of {size} generated rows")
        run = {
            "rows": size,
            "width": width,
            "wall_seconds": child.pop("wall_seconds"),
            "peak_rss_mib": child.pop("peak_rss_mib"),
            "feature_mib": round(size * width * 4 / 2**20, 1),
            **child,
        }
        log.info("bench-audit: %s", run)
        runs.append(run)
        path.unlink()
    return {"benchmark": "audit", "machine": machine(), "runs": runs, "C": C}


def _recall_row(label: str, planted: dict[str, Any], thresholds: Sequence[float]) -> str:
    recall = " | ".join(f"{planted['recall'][str(t)]:.1%}" for t in thresholds)
    return f"| {label} | {planted['min']} | {planted['median']} | {recall} |"


def _calibration_lines(calibration: dict[str, Any]) -> list[str]:
    """The threshold's calibration: recall of planted copies and distinct pairs above each threshold."""
    raw, centred, thresholds = calibration["raw"], calibration["centred"], calibration["thresholds"]
    lines = [
        "",
        f"Duplicate threshold: {calibration['planted']} photos of `{calibration['features']}` altered and "
        f"re-extracted ({calibration['backbone']} at {calibration['image_size']} px); recall of the altered "
        "copies and count of distinct-photo pairs at each cosine threshold.",
        "",
        "| | min cosine | median | " + " | ".join(f">= {t}" for t in thresholds) + " |",
        "|---|---:|---:|" + "---:|" * len(thresholds),
    ]
    lines += [_recall_row(f"{name} copies", p, thresholds) for name, p in raw["planted"].items()]
    for label, figures in (
        (f"pairs of the {raw['distinct_pairs']:,} in the file", raw),
        ("(centred features) pairs of the file", centred),
    ):
        lines.append(f"| {label} | | | " + " | ".join(str(figures["pairs_above"][str(t)]) for t in thresholds) + " |")
    lines += [_recall_row(f"(centred features) {name} copies", p, thresholds) for name, p in centred["planted"].items()]
    return lines + [
        "",
        "Most similar pairs in the file: "
        + "; ".join(f"{' = '.join(p['ids'])} ({p['cosine']})" for p in raw["top_pairs"][:5])
        + ".",
        "",
        "Planted off-distribution images, outlier score (rank among the file's rows; its highest own score "
        f"is {raw['own_score_max']}): "
        + ", ".join(f"{o['image']} {o['score']} (#{o['rank']})" for o in raw["off_distribution"])
        + ".",
    ]


def audit_table(result: dict[str, Any]) -> str:
    """Markdown tables of a `bench-audit` result: scale, then the threshold's calibration."""
    host = result["machine"]
    steps = ("read", "similarity_search", "duplicates", "label_errors", "outliers", "write")
    width = result["runs"][0]["width"] if result["runs"] else "-"
    lines = [
        f"Audit of generated feature rows (width {width}, 10 classes, 80/10/10 splits), {host['cpus']} CPUs "
        f"({host['processor']}), fresh process per size, contact sheets off, probe C={result['C']} fixed.",
        "",
        "| rows | features MiB | wall s | " + " | ".join(f"{s} s" for s in steps) + " | peak RSS MiB |",
        "|---:|---:|---:|" + "---:|" * len(steps) + "---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['rows']:,} | {run['feature_mib']} | {run['wall_seconds']} | "
            + " | ".join(str(run["seconds"].get(s, "")) for s in steps)
            + f" | {run['peak_rss_mib']} |"
        )
    if result.get("calibration"):
        lines += _calibration_lines(result["calibration"])
    return "\n".join(lines) + "\n"
