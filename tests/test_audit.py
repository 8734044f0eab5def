"""`make audit`: duplicates, label errors, outliers, class overlap; EXCLUDE; top losses.

The mechanisms are tested on generated features (exact and near copies in feature
space, flipped labels, far-away rows), where the truth is known; the calibrated
duplicate threshold is tested on real photos and the shared MobileNetV2 weights
(skipped without ../shared), since the random `tiny` backbone cannot tell photos apart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder
from PIL import Image, ImageOps

from pipeline.audit.duplicates import clusters_of
from pipeline.audit.exclusion import exclusion_decisions
from pipeline.audit.findings import audit_features
from pipeline.audit.graph import GraphSettings, build_graph
from pipeline.audit.labels import confident_learning
from pipeline.audit.neighbours import pairs_above, similarity_search
from pipeline.audit.outliers import robust_z
from pipeline.audit.rows import unit_rows
from pipeline.cli import main
from pipeline.config import AuditConfig, HeadConfig
from pipeline.decisions import read_decisions
from pipeline.digests import DigestCache
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features.store import FORMAT_VERSION, read_features, write_features
from pipeline.heads.train import train_head
from pipeline.runs import top_loss_rows

CLASSES = ("cat", "dog", "fox")


def write_file(path: Path, splits: dict, *, classes=CLASSES, key=None, data_dir=None) -> Path:
    """A finished feature file from {split: (features, labels, ids)}."""
    stored = {
        name: (
            [(x.astype(np.float32), np.asarray(y, np.int64), np.arange(len(y)), list(ids))],
            {"spec": f"test:{name}", "num_inputs": len(y), "num_skipped": 0, "skipped": []},
        )
        for name, (x, y, ids) in splits.items()
    }
    attrs = {
        "format_version": FORMAT_VERSION,
        "key": key or {"dataset": "generated", "seed": 0},
        "class_names": list(classes),
        "config": {"data": {"dataset": "generated", "data_dir": data_dir}},
        "feature_dim": next(iter(splits.values()))[0].shape[1],
    }
    return write_features(path, attrs=attrs, splits=stored, feature_dim=attrs["feature_dim"], dtype=np.float32)


def clustered(rng, counts: dict[str, int], *, width=256, spread=1.0, noise=1.0):
    """{split: (features, labels, ids)}: non-negative rows around one mean per class
    (distinct rows stay below cosine 0.8, like distinct photos)."""
    means = rng.normal(0, spread, (len(CLASSES), width))
    out = {}
    for split, n in counts.items():
        y = np.arange(n) % len(CLASSES)
        x = np.maximum(means[y] + rng.normal(0, noise, (n, width)), 0)
        out[split] = (x, y, [f"{split}/{CLASSES[c]}/{i}.jpg" for i, c in enumerate(y)])
    return out


def findings(out_dir: Path, kind: str) -> list[dict]:
    return [f for f in json.loads((out_dir / "audit.json").read_text())["findings"] if f["kind"] == kind]


# --------------------------------------------------------------- neighbour graph
def test_exact_graph_equals_brute_force_whatever_the_block_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(53, 16)).astype(np.float32)
    x[40:45] = x[:5] + rng.normal(0, 0.01, (5, 16))  # a few near copies, some in other blocks
    unit = unit_rows(x)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    i, j = np.nonzero(np.triu(sim >= 0.9, 1))
    for block in (7, 4096):  # memory-bounded block reading gives the same graph
        graph = build_graph(x, GraphSettings(k=4, block_rows=block, recall_queries=20))
        found = pairs_above(graph, 0.9)
        assert sorted(map(tuple, found.pairs.tolist())) == sorted(zip(i.tolist(), j.tolist()))
        assert {tuple(p) for p in found.pairs.tolist()} == {(r, r + 40) for r in range(5)}
        np.testing.assert_allclose(found.knn_similarity, -np.sort(-sim, axis=1)[:, :4], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(sim, found.knn_index, axis=1), found.knn_similarity, atol=1e-5)
        assert graph.meta["method"] == "exact" and graph.meta["recall"]["recall_at_k"] == 1.0


def test_approximate_graph_agrees_with_exact_on_clustered_data():
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 1, (30, 16))[np.arange(1500) % 30]  # 30 clusters in a 16-d subspace of 64
    x = ((centres + rng.normal(0, 0.3, (1500, 16))) @ rng.normal(0, 1, (16, 64))).astype(np.float32)
    x[1000:1010] = x[:10] * 1.01 + rng.normal(0, 0.005, (10, 64))  # planted copies
    exact = build_graph(x, GraphSettings(k=5, recall_queries=1000))
    approximate = build_graph(x, GraphSettings(k=5, exact_below=100, pca_dim=32, nprobe=8, recall_queries=1000))
    assert approximate.meta["method"] == "approximate" and approximate.index is not None
    assert approximate.meta["recall"]["queries"] == 1000
    assert approximate.meta["recall"]["recall_at_k"] >= 0.95, approximate.meta["recall"]
    held = (approximate.similarity >= exact.similarity[:, -1:] - 1e-4).sum(axis=1).mean() / 5
    assert held >= 0.95
    planted = {(r, r + 1000) for r in range(10)}
    assert planted <= {tuple(p) for p in pairs_above(approximate, 0.99).pairs.tolist()}
    assert {tuple(p) for p in pairs_above(approximate, 0.99).pairs.tolist()} == {
        tuple(p) for p in pairs_above(exact, 0.99).pairs.tolist()
    }


def test_clusters_join_chains_of_pairs():
    assert clusters_of(7, np.array([[0, 3], [3, 5], [1, 2]])) == [[0, 3, 5], [1, 2]]


def test_too_many_pairs_is_an_error_not_a_memory_blow_up():
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="Raise DUPLICATE_THRESHOLD"):
        similarity_search(unit_rows(np.ones((50, 4))), threshold=0.9, k=2, max_pairs=10)


@pytest.fixture
def planted(tmp_path):
    """Generated features with near copies planted within and across splits."""
    rng = np.random.default_rng(1)
    splits = clustered(rng, {"train": 90, "validation": 30, "test": 30})
    copies = {
        ("train", 0): ("test", 5),
        ("train", 7): ("validation", 11),
        ("validation", 3): ("test", 20),
        ("train", 12): ("train", 50),
    }
    for (s, r), (t, q) in copies.items():
        x, y, _ = splits[t]
        x[q] = splits[s][0][r] * 1.02 + rng.normal(0, 0.01, x.shape[1])  # brighter, re-encoded
        y[q] = splits[s][1][r]
    splits = {s: (x, y, [f"{s}/{CLASSES[c]}/{i}.jpg" for i, c in enumerate(y)]) for s, (x, y, _) in splits.items()}
    path = write_file(tmp_path / "planted.h5", splits)
    expected = {tuple(sorted((splits[s][2][r], splits[t][2][q]))) for (s, r), (t, q) in copies.items()}
    return path, expected


def test_planted_copies_are_all_found_leaks_first_without_false_pairs(planted, tmp_path):
    path, expected = planted
    result = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=4))
    pairs = findings(result.out_dir, "duplicates")
    assert {tuple(sorted(f["ids"])) for f in pairs} == expected
    crossing = [f["cross_split"] for f in pairs]
    assert crossing == sorted(crossing, reverse=True) and sum(crossing) == 3
    assert all(f["match"] == "near" and f["score"] >= 0.99 for f in pairs)
    assert result.counts["duplicate_clusters"] == 4 and result.counts["cross_split_pairs"] == 3
    record = json.loads((result.out_dir / "audit.json").read_text())
    excluded = sorted(i for c in record["clusters"] for i in c["exclude"])
    # A leak drops its train copy; a pair inside train keeps its first copy.
    assert excluded == sorted(["train/cat/0.jpg", "train/dog/7.jpg", "train/cat/50.jpg"])
    assert {p.name for p in result.out_dir.iterdir()} == {
        "audit.json",
        "audit.md",
        "duplicates.png",
        "label_issues.png",
        "outliers.png",
    }
    assert not [p for p in result.out_dir.parent.iterdir() if p.name.startswith(".")]


def test_graph_is_persisted_and_reused_until_its_settings_change(planted, tmp_path, monkeypatch):
    import pipeline.audit.graphstore as graphstore

    builds = []
    real = graphstore.build_graph
    monkeypatch.setattr(graphstore, "build_graph", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    path, expected = planted
    config = AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)
    first = audit_features(path, config)
    again = audit_features(path, config)
    assert len(builds) == 1
    record = json.loads((again.out_dir / "audit.json").read_text())
    assert record["graph"]["built"] is False and record["graph"]["recall"]["queries"] >= 150
    assert first.counts == again.counts
    assert "recall@10 against exact search 1.0000" in (again.out_dir / "audit.md").read_text()
    audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0, neighbours=5))
    assert len(builds) == 2
    # The approximate path (forced by a tiny EXACT_BELOW) finds the same planted pairs.
    forced = AuditConfig(audit_dir=str(tmp_path / "approx"), top=0, exact_below=10, pca_dim=16, block_rows=64)
    out = audit_features(path, forced).out_dir
    assert {tuple(sorted(f["ids"])) for f in findings(out, "duplicates")} == expected
    assert json.loads((out / "audit.json").read_text())["graph"]["method"] == "approximate"


def test_byte_identical_files_are_exact_duplicates(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "photos"
    splits = clustered(rng, {"train": 30, "validation": 15})
    for s, (_, _, ids) in splits.items():
        for i, name in enumerate(ids):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(f"{s} {i}".encode())
    shutil.copyfile(root / splits["train"][2][4], root / splits["validation"][2][9])
    path = write_file(tmp_path / "bytes.h5", splits, data_dir=str(root))
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)).out_dir
    (pair,) = findings(out, "duplicates")
    assert pair["match"] == "exact" and pair["cross_split"] and set(pair["splits"]) == {"train", "validation"}
    assert pair["paths"][0] == str(root / pair["ids"][0])


# ----------------------------------------------------------------- label errors
def test_flipped_labels_rank_at_the_top_of_the_label_findings(tmp_path):
    rng = np.random.default_rng(3)
    splits = clustered(rng, {"train": 400, "validation": 80}, spread=0.5)
    x, y, ids = splits["train"]
    flipped = rng.choice(len(y), size=20, replace=False)  # 5% of train
    original = y.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 3, len(flipped))) % 3
    path = write_file(tmp_path / "noisy.h5", splits)
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)).out_dir
    labels = findings(out, "label")
    assert [f["rank"] for f in labels] == list(range(1, len(labels) + 1))
    assert [f["score"] for f in labels] == sorted(f["score"] for f in labels)  # worst first
    top = {f["ids"][0] for f in labels[: 2 * len(flipped)]}
    caught = [ids[r] for r in flipped if ids[r] in top]
    assert len(caught) >= 0.8 * len(flipped), (len(caught), len(labels))
    truth = {ids[r]: (CLASSES[y[r]], CLASSES[original[r]]) for r in flipped}
    assert all((f["given"], f["suggested"]) == truth[f["ids"][0]] for f in labels if f["ids"][0] in truth)
    overlap = findings(out, "overlap")
    assert overlap and overlap[0]["count"] >= overlap[-1]["count"]


def test_a_class_with_fewer_examples_than_folds_is_left_out_of_the_label_check_not_the_audit(tmp_path, caplog):
    """A long-tailed dataset keeps its audit: the rare class's images are not checked, and it says so."""
    rng = np.random.default_rng(4)
    splits = clustered(rng, {"train": 120, "validation": 30}, spread=0.5)
    x, y, ids = splits["train"]
    y[y == 2] = 0
    y[:3] = 2  # "fox": 3 train examples, none in validation
    splits["validation"][1][splits["validation"][1] == 2] = 1
    path = write_file(tmp_path / "tail.h5", splits)
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0, folds=5)).out_dir
    probe = json.loads((out / "audit.json").read_text())["probe"]
    assert probe["classes_not_checked"] == {"fox": 3} and probe["rows"] == 147
    assert all(f["given"] != "fox" for f in findings(out, "label"))
    assert "1 classes have fewer than FOLDS=5 examples" in caplog.text and "fox (3)" in caplog.text
    assert "**Not checked for label errors**: 1 classes with fewer than 5" in (out / "audit.md").read_text()
    with pytest.raises(DataError, match="FOLDS=200 needs at least 200 examples of two classes"):
        audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit2"), top=0, folds=200))


def test_confident_learning_flags_confidently_wrong_labels_and_suggests_the_class():
    proba = np.array(
        [[0.98, 0.01, 0.01]] * 8
        + [[0.01, 0.98, 0.01]] * 8
        + [[0.01, 0.01, 0.98]] * 8
        + [[0.99, 0.005, 0.005], [0.5, 0.45, 0.05]]
    )
    labels = np.array([0] * 8 + [1] * 8 + [2] * 8 + [2, 1])
    issues = confident_learning(proba, labels)
    assert np.flatnonzero(issues.issue).tolist() == [24]  # p(dog) 0.45 is below the dog threshold 0.92
    assert issues.suggested[24] == 0 and issues.ranked().tolist() == [24]
    assert issues.confident_joint.sum() == len(labels)
    np.testing.assert_array_equal(issues.confident_joint.sum(axis=1), np.bincount(labels))


# --------------------------------------------------------------------- outliers
def test_far_away_rows_rank_first_among_outliers(tmp_path):
    rng = np.random.default_rng(4)
    splits = clustered(rng, {"train": 120, "validation": 30})
    x, y, ids = splits["train"]
    x[[10, 60]] = 0.0
    x[10, :4] = 50.0  # a blank frame: all its energy where the photos have none
    x[60] = rng.uniform(0, 30, x.shape[1]) * (rng.uniform(size=x.shape[1]) < 0.1)  # sparse noise
    x[[10, 60]] += 1e-3
    path = write_file(tmp_path / "odd.h5", splits)
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=2)).out_dir
    outliers = findings(out, "outlier")
    assert {f["ids"][0] for f in outliers[:2]} == {ids[10], ids[60]}
    assert outliers[0]["z"] >= 3.5 and outliers[0]["exclude"] == outliers[0]["ids"]


def test_robust_z_survives_a_zero_median_absolute_deviation():
    z = robust_z(np.array([1.0] * 9 + [5.0]))
    assert z[-1] > 3.5 and np.all(z[:-1] == 0)


# ---------------------------------------------------------------------- EXCLUDE
def train_split(path):
    return read_features(path).splits


def with_files(path: Path, root: Path) -> Path:
    """A copy of the feature file `path` whose rows have files under `root` (bytes: the id, so all differ):
    EXCLUDE records decisions, which are keyed by the files' content."""
    cached = read_features(path)
    for split in cached.splits.values():
        for i in split.ids:
            (root / i).parent.mkdir(parents=True, exist_ok=True)
            (root / i).write_text(str(i))
    return write_file(
        path.with_name(f"files-{path.name}"),
        {s: (a.features, a.labels, a.ids) for s, a in cached.splits.items()},
        data_dir=str(root),
    )


def test_exclude_drops_exactly_the_flagged_train_rows(planted, tmp_path):
    path = with_files(planted[0], tmp_path / "images")
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)).out_dir
    audit = out / "audit.json"
    record = json.loads(audit.read_text())
    flagged = {i for c in record["clusters"] for i in c["exclude"]}
    flagged |= {i for f in record["findings"] if f["kind"] in ("label", "outlier") for i in f["exclude"]}
    assert all(i.startswith("train/") for i in flagged)
    runs = str(tmp_path / "runs")
    audits = str(tmp_path / "audit")
    plain = train_head(path, HeadConfig(runs_dir=runs, grid_images=0, audit_dir=audits))
    run = train_head(path, HeadConfig(runs_dir=runs, grid_images=0, audit_dir=audits, exclude=str(audit)))
    splits = read_features(path).splits
    assert (
        run.metrics["train_examples"]
        == len(splits["train"]) - len(flagged)
        == plain.metrics["train_examples"] - len(flagged)
    )
    for split in ("validation", "test"):
        assert run.metrics[split]["n"] == len(splits[split]) == plain.metrics[split]["n"]
    assert run.run_dir.name.startswith(plain.run_dir.name + "__dec-")
    decisions = read_decisions(tmp_path / "audit" / "files-planted.decisions.csv")
    assert {d.path for d in decisions.values() if d.decision == "exclude"} == flagged
    assert run.metrics["decisions"]["applied"]["train"] == {"exclude": len(flagged), "relabel": 0}


def test_exclude_kinds_choose_what_is_recorded(planted, tmp_path):
    path = with_files(planted[0], tmp_path / "images")
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)).out_dir
    record = json.loads((out / "audit.json").read_text())
    config = HeadConfig(
        runs_dir=str(tmp_path / "runs"),
        grid_images=0,
        audit_dir=str(tmp_path / "audit"),
        exclude=str(out / "audit.json"),
        exclude_kinds="duplicates",
    )
    only = train_head(path, config)
    dropped = {i for c in record["clusters"] for i in c["exclude"]}
    assert only.metrics["train_examples"] == len(read_features(path).splits["train"]) - len(dropped)


def test_exclude_with_an_audit_of_another_file_is_an_error(planted, tmp_path):
    path = with_files(planted[0], tmp_path / "images")
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), top=0)).out_dir
    cached = read_features(path)
    other = write_file(
        tmp_path / "other.h5",
        {s: (a.features, a.labels, a.ids) for s, a in cached.splits.items()},
        key={"dataset": "generated", "seed": 1},
        data_dir=str(tmp_path / "images"),
    )
    config = HeadConfig(
        runs_dir=str(tmp_path / "runs"), grid_images=0, audit_dir=str(tmp_path), exclude=str(out / "audit.json")
    )
    with pytest.raises(CacheError, match="audit of another feature file .*seed: file has 0, asked 1"):
        train_head(other, config)
    with pytest.raises(ConfigError, match="Expected an audit.json of `make audit`"):
        exclusion_decisions(tmp_path / "missing.json", None, DigestCache())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"exclude": "a.json", "exclude_kinds": "labels"}, "comma-separated subset of duplicates,label,outlier"),
        ({"exclude_kinds": "label"}, "needs exclude"),
    ],
)
def test_exclude_options_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig(**kwargs)
    assert HeadConfig(exclude="a.json", exclude_kinds=" outlier,label").exclude_kinds == "label,outlier"


def test_audit_options_are_validated():
    with pytest.raises(ConfigError, match="folds must be >= 2"):
        AuditConfig(folds=1)
    with pytest.raises(ConfigError, match=r"duplicate_threshold must be in \(0, 1\]"):
        AuditConfig(duplicate_threshold=1.5)


# -------------------------------------------------------------------------- CLI
def test_cli_audit_writes_json_report_sheets_and_prints_one_summary_line(tmp_path, capsys):
    folder = make_folder(tmp_path / "photos", 8, classes=("cat", "dog"), layout="presplit")
    shutil.copyfile(folder / "train/cat/cat.0.jpg", folder / "test/cat/copy.jpg")
    flags = [
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--output-dir",
        str(tmp_path / "features"),
        "--no-progress",
    ]
    assert main(["features", *flags]) == 0
    capsys.readouterr()
    flags.remove("--no-progress")
    # The random tiny backbone maps all these photos close together: only the copy is certain.
    assert (
        main(
            [
                "audit",
                *flags,
                "--audit-dir",
                str(tmp_path / "audit"),
                "--audit-top",
                "4",
                "--folds",
                "3",
                "--duplicate-threshold",
                "0.99999",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "audit: 33 rows; duplicates: 1 pairs in 1 clusters (1 across splits, 1 byte-identical); label issues: "
    )
    out = Path(lines[0].rpartition(" -> ")[2])
    assert {"audit.json", "audit.md", "duplicates.png", "label_issues.png", "outliers.png"} <= {
        p.name for p in out.iterdir()
    }
    exact = [f for f in findings(out, "duplicates") if f["match"] == "exact"]
    assert [sorted(f["ids"]) for f in exact] == [["test/cat/copy.jpg", "train/cat/cat.0.jpg"]]
    assert "# Data audit" in (out / "audit.md").read_text()
    similar = ["similar", *flags, "--audit-dir", str(tmp_path / "audit"), "--top", "3"]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 cut short")  # left out, with a warning
    assert main([*similar, str(folder / "train/cat/cat.0.jpg"), str(tmp_path / "broken.jpg")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not any("broken.jpg" in line for line in lines)
    first = lines[1].split()
    assert float(first[0]) >= 0.999 and first[-1] == "COPY" and first[-2].endswith(("cat.0.jpg", "copy.jpg"))
    assert lines[-1].startswith("similar: backbone") and (tmp_path / "audit" / f"{out.name}.similar.png").exists()
    assert main(["audit", *flags, "--audit-dir", str(tmp_path / "audit"), "--folds", "1"]) == 2
    runs = ["--runs-dir", str(tmp_path / "runs"), "--grid-images", "0", "--audit-dir", str(tmp_path / "audit")]
    assert main(["head", *flags, *runs, "--exclude", str(out / "audit.json"), "--exclude-kinds", "duplicates"]) == 0
    trained = json.loads(next((tmp_path / "runs").glob("*__dec-*/metrics.json")).read_text())
    assert trained["train_examples"] == 15 and trained["decisions"]["applied"]["train"]["exclude"] == 1
    assert trained["decisions"]["test_not_applied"]["exclude"] == 1  # the leak's test copy: same bytes
    assert main(["head", *flags, *runs, "--exclude-kinds", "label"]) == 2


def test_tfds_thumbnails_are_read_back_with_the_tf_reader(dummy_tfds_dir, tmp_path):
    from pipeline.audit.rows import stack_splits
    from pipeline.audit.sheets import read_thumbnails
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features.extract import extract_features

    data = DataConfig(
        dataset="dummy_mnist", tfds_dir=str(dummy_tfds_dir), splits={"train": "train", "validation": "test"}
    )
    config = FeaturesConfig(data=data, backbone="tiny", weights="none", image_size=32, output_dir=str(tmp_path))
    cached = read_features(extract_features(config, progress=False).path)
    rows = stack_splits(cached)
    wanted = {(str(rows.splits[r]), str(rows.ids[r])) for r in (0, 5, 25)}
    images = read_thumbnails(cached, rows, wanted)
    assert set(images) == wanted
    assert all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in images.values())


# ------------------------------------------------------------------ top losses
def test_top_losses_are_the_rows_least_sure_of_their_true_label():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    assert top_loss_rows(proba, np.array([0, 0, 1, 0]), 3).tolist() == [1, 2, 3]


# ---------------------------------------------------------- real photos, real weights
@pytest.mark.assets
def test_calibrated_threshold_catches_altered_copies_not_distinct_photos(shared_assets, tmp_path):
    """Altered copies of real photos (JPEG quality 30, resized 90%, cropped 5%, flipped)
    planted across splits are all found by the default threshold; distinct photos of
    the same class pair with nothing; a blank frame and noise are the top outliers."""
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features.extract import extract_features

    source = shared_assets / "datasets" / "cats_and_dogs_filtered" / "validation"
    root = tmp_path / "photos"
    originals = {}
    for name in ("cats", "dogs"):
        photos = sorted((source / name).iterdir())[:20]
        for split, chosen in (("train", photos[:14]), ("validation", photos[14:])):
            for p in chosen:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, root / split / name / p.name)
        originals[name] = photos[:4]
    alterations = {
        "q30": lambda im: (im, 30),
        "resized": lambda im: (im.resize((round(im.width * 0.9), round(im.height * 0.9))), 95),
        "cropped": lambda im: (im.crop((round(im.width * 0.05), round(im.height * 0.05), im.width, im.height)), 95),
        "flipped": lambda im: (ImageOps.mirror(im), 95),
    }
    expected = set()
    for name, photos in originals.items():
        for p, (tag, alter) in zip(photos, alterations.items()):
            image, quality = alter(Image.open(p).convert("RGB"))
            target = root / "validation" / name / f"{tag}-{p.name}"
            image.save(target, quality=quality)
            expected.add((f"train/{name}/{p.name}", f"validation/{name}/{target.name}"))
    Image.new("RGB", (300, 200), (255, 255, 255)).save(root / "train" / "cats" / "blank.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "train" / "dogs" / "noise.png")
    weights = shared_assets / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    config = FeaturesConfig(
        data=DataConfig(dataset=None, data_dir=str(root)),
        weights=str(weights),
        image_size=160,
        output_dir=str(tmp_path / "features"),
    )
    path = extract_features(config, progress=False).path
    out = audit_features(path, AuditConfig(audit_dir=str(tmp_path / "audit"), folds=3)).out_dir
    pairs = {tuple(sorted(f["ids"])) for f in findings(out, "duplicates")}
    assert pairs == expected
    ranking = json.loads((out / "audit.json").read_text())["outlier_scores"]["ranking"]
    assert {r["id"] for r in ranking[:2]} == {"train/cats/blank.jpg", "train/dogs/noise.png"}, ranking[:4]


def test_the_label_probe_skips_the_pca_when_rows_are_few_for_its_width(tmp_path):
    """A PCA fitted on fewer rows than its width has empty components that standardizing turns into noise."""
    from pipeline.audit.graphstore import probe_rows

    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 300)).astype(np.float32)
    settings = GraphSettings(pca_dim=256)
    graph = build_graph(features, settings)
    probe_x, kind = probe_rows(features, graph, tmp_path, settings)
    assert kind == "features" and probe_x.shape == (200, 300)
