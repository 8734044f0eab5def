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

    from pipeline.features.backbones import input_resize
    from pipeline.features.extractor import build_extractor
    from pipeline.features.forward import compiled_forward
    from pipeline.images import decode_and_resize

    resize = input_resize(config)
    model = build_extractor(
        config.backbone, image_size=config.image_size, weights=config.weights_arg, pooling=config.pooling
    )
    forward = compiled_forward(model, config.image_size, config.batch_size)

    def features_of(paths: Sequence[Path]) -> np.ndarray:
        import tensorflow as tf

        out = []
        for start in range(0, len(paths), 32):
            images = [decode_and_resize(tf.io.read_file(str(p)), resize) for p in paths[start : start + 32]]
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


_AUDIT_CHILD = """
import json, sys
from pathlib import Path
from pipeline.audit.findings import audit_features
from pipeline.config import AuditConfig
config = AuditConfig(audit_dir=sys.argv[2], top=0, C=float(sys.argv[3]))
result = audit_features(Path(sys.argv[1]), config)
record = json.loads((result.out_dir / "audit.json").read_text())
found = {tuple(sorted(f["ids"])) for f in record["findings"] if f["kind"] == "duplicates"}
planted = json.loads(Path(sys.argv[4]).read_text())
recall = {kind: sum(tuple(p) in found for p in pairs) / len(pairs) for kind, pairs in planted.items()}
print(json.dumps({"seconds": result.seconds, "counts": result.counts, "graph": record["graph"],
                  "probe_accuracy": record["probe"]["out_of_fold_accuracy"], "planted_recall": recall}))
"""

_QUERY_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
started = time.perf_counter()
from pipeline.audit.similar import DatasetIndex
index = DatasetIndex.open(Path(sys.argv[1]))
opened = time.perf_counter() - started
rows = index.unit_rows(np.array([int(sys.argv[2])]))
step = time.perf_counter()
ids, sims = index.search(rows, 10)
print(json.dumps({"open_seconds": round(opened, 3), "query_seconds": round(time.perf_counter() - step, 4),
                  "top1_is_self": bool(ids[0, 0] == int(sys.argv[2]))}))
"""


def _bench_size(work_dir: Path, size: int, width: int, C: float) -> dict[str, Any]:
    """One size: generate, audit in a fresh process, then query the graph in another, then delete the file."""
    import json

    from pipeline.audit.graphstore import graph_dir
    from pipeline.bench.planted import generated_features

    path, planted = generated_features(Path(work_dir) / f"generated-{size}.h5", size, width=width)
    planted_file = Path(work_dir) / f"planted-{size}.json"
    planted_file.write_text(json.dumps(planted))
    audit_dir = Path(work_dir) / "audit"
    child = run_python(
        _AUDIT_CHILD, str(path), str(audit_dir), str(C), str(planted_file), what=f"The audit of {size} generated rows"
    )
    folder = graph_dir(audit_dir, path)
    query = run_python(_QUERY_CHILD, str(folder), str(size // 2), what=f"A query against {size} rows")
    run = {
        "rows": size,
        "width": width,
        "wall_seconds": child.pop("wall_seconds"),
        "peak_rss_mib": child.pop("peak_rss_mib"),
        "feature_mib": round(size * width * 2 / 2**20, 1),
        "query": {k: query[k] for k in ("open_seconds", "query_seconds", "top1_is_self", "wall_seconds")},
        **child,
    }
    path.unlink()
    return run


def bench_audit(
    *, work_dir: Path, sizes: Sequence[int] = (10_000, 100_000), width: int = 1280, C: float = 0.01
) -> dict[str, Any]:
    """Seconds (per step), peak resident memory and recall of an audit of generated rows (`bench.planted`).

    Each size runs in a fresh process (`python -c`, the audit itself without contact
    sheets), so its peak memory is its own; a second process then queries the
    persisted graph with one row, as `make similar` does. The probe's C is fixed (the
    validation sweep is `make head`'s cost, measured by `make bench-head`).
    """
    runs = []
    for size in sizes:
        run = _bench_size(Path(work_dir), size, width, C)
        log.info("bench-audit: %s", run)
        runs.append(run)
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
    steps = ("read", "neighbour_graph", "duplicates", "label_errors", "outliers", "write")
    width = result["runs"][0]["width"] if result["runs"] else "-"
    lines = [
        f"Audit of generated feature rows (`pipeline/bench/planted.py`: width {width}, float16, 1000 clusters, "
        f"10 classes, 80/10/10 splits, duplicates and leaks planted at known pairs), {host['cpus']} CPUs "
        f"({host['processor']}), fresh process per size, contact sheets off, probe C={result['C']} fixed.",
        "",
        "| rows | graph | recall@k (sampled rows) | planted duplicates / leaks found | wall s | "
        + " | ".join(f"{s} s" for s in steps)
        + " | peak RSS MiB | query s (open) |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(steps) + "---:|---:|",
    ]
    for run in result["runs"]:
        graph, recall = run["graph"], run["graph"]["recall"]
        lines.append(
            f"| {run['rows']:,} | {graph['method']}: {graph['index']} | {recall['recall_at_k']} ({recall['queries']}) "
            f"| {run['planted_recall']['duplicates']:.3f} / {run['planted_recall']['leaks']:.3f} "
            f"| {run['wall_seconds']} | "
            + " | ".join(str(run["seconds"].get(s, "")) for s in steps)
            + f" | {run['peak_rss_mib']} | {run['query']['query_seconds']} ({run['query']['open_seconds']}) |"
        )
    if result.get("calibration"):
        lines += _calibration_lines(result["calibration"])
    if result.get("flips"):
        from pipeline.bench.flips import flips_table

        lines += ["", flips_table(result["flips"]).rstrip()]
    return "\n".join(lines) + "\n"
