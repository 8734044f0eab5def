"""The iterate loop stays light: a no-op `features` and a logistic `head` never import TensorFlow.

Importing TensorFlow costs seconds, scikit-learn about one, more than the logistic fit itself;
these tests pin the behaviour (which modules load), and `make bench` measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_folder

_PROBE = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("tensorflow", "keras", "tensorflow_datasets", "sklearn") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _run(argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _extract(root, layout: str):
    from pipeline.cli import main

    folder = make_folder(root / "images", 6, layout=layout)
    flags = [
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--features-dir",
        str(root / "features"),
        "--no-progress",
    ]
    assert main(["features", *flags]) == 0
    return root, flags


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Split folders, as most real data sets come."""
    return _extract(tmp_path_factory.mktemp("fast"), "presplit")


@pytest.fixture(scope="module")
def extracted_flat(tmp_path_factory):
    """One folder per class: validation and test are carved (seeded, stratified) to compute the key."""
    return _extract(tmp_path_factory.mktemp("flat"), "flat")


def test_an_up_to_date_features_run_imports_no_tensorflow_nor_scikit_learn(extracted):
    _, flags = extracted
    assert _run(["features", *flags]) == {"code": 0, "heavy": []}


def test_on_a_flat_folder_a_no_op_carves_the_splits_without_scikit_learn(extracted_flat):
    _, flags = extracted_flat
    assert _run(["features", *flags]) == {"code": 0, "heavy": []}


def test_a_logistic_head_run_imports_no_tensorflow_plots_included(extracted):
    root, flags = extracted
    result = _run(["head", *flags, "--runs-dir", str(root / "runs")])
    assert result == {"code": 0, "heavy": ["sklearn"]}  # the logistic probe is scikit-learn's
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    assert {"top_losses.png", "confusion_matrix.png", "report.md", "head.joblib"} <= {p.name for p in run.iterdir()}


def test_a_head_on_a_given_feature_file_checks_only_the_flags_given(extracted_flat, tmp_path, capsys):
    """FEATURES=<file> alone trains on that file: the defaults describe another dataset (cats_vs_dogs)."""
    from pipeline.cli import main

    root, _ = extracted_flat
    (path,) = (root / "features").glob("*.h5")
    assert main(["head", "--features", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert main(["head", "--features", str(path), "--image-size", "48", "--backbone", "tiny"]) == 2
    assert "image_size: file has 32, asked 48" in capsys.readouterr().err


def test_a_dense_head_run_imports_no_scikit_learn(extracted):
    """Heads are not scikit-learn estimators by class: the dense head never pays its import (0.8 s)."""
    root, flags = extracted
    result = _run(["head", *flags, "--runs-dir", str(root / "dense-runs"), "--head", "dense", "--epochs", "2"])
    assert result == {"code": 0, "heavy": ["keras", "tensorflow"]}


def test_a_head_is_still_a_scikit_learn_estimator_in_shape():
    from sklearn.base import clone

    from pipeline.heads.logistic import LogisticHead

    head = LogisticHead(C=0.5, max_iter=50)
    copy = clone(head)
    assert copy is not head and copy.get_params() == head.get_params()
    assert copy.get_params()["C"] == 0.5 and repr(copy).startswith("LogisticHead(C=0.5, ")


def test_a_head_run_reports_its_phases(extracted, tmp_path):
    root, flags = extracted
    result = _run(["head", *flags, "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "run.json")])
    assert result["code"] == 0
    phases = json.loads((tmp_path / "run.json").read_text())["phases"]
    assert list(phases)[:2] == ["start-up and imports", "stage imports"]
    assert {
        "read features",
        "fit",
        "evaluate",
        "save head",
        "plot confusion matrix",
        "plot top losses",
        "report",
    } <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    again = _run(["head", *flags, "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "again.json")])
    assert again["code"] == 0
    phases = json.loads((tmp_path / "again.json").read_text())["phases"]
    assert "up-to-date check" in phases and "fit" not in phases  # found finished, not retrained


# ------------------------------------------------------- numpy in place of sklearn.metrics
@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_are_scikit_learns(k):
    """Counted with numpy, so the dense head's run needs no scikit-learn (about a second to import)."""
    from sklearn import metrics as skm

    from pipeline.metrics import classification_metrics

    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 300)
    labels[labels == k - 1] = 0  # a class absent from the labels
    proba = rng.random((300, k)).astype(np.float32)
    names = [f"c{i}" for i in range(k)]
    got = classification_metrics(proba, labels, names)
    predicted = proba.argmax(axis=1)
    assert got["confusion_matrix"] == skm.confusion_matrix(labels, predicted, labels=range(k)).tolist()
    want = skm.precision_recall_fscore_support(labels, predicted, labels=range(k), zero_division=0)
    for name, p, r, f, n in zip(names, *want):
        c = got["per_class"][name]
        np.testing.assert_allclose([c["precision"], c["recall"], c["f1"], c["support"]], [p, r, f, n], atol=1e-12)
