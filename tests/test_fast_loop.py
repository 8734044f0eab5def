"""The iterate loop stays light: a no-op `features` and a logistic `head` never import TensorFlow.

Importing TensorFlow costs seconds, more than the logistic fit itself; these tests pin the
behaviour (which modules load), and `make bench` measures the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_folder

_PROBE = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("tensorflow", "keras", "tensorflow_datasets") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _run(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("fast")
    # Split folders, as most real data sets come: no scikit-learn split needed either.
    folder = make_folder(root / "images", 6, layout="presplit")
    flags = ["--data-dir", str(folder), "--backbone", "tiny", "--weights", "none", "--features-dir",
             str(root / "features"), "--no-progress"]
    assert main(["features", *flags]) == 0
    return root, flags


def test_an_up_to_date_features_run_imports_no_tensorflow(extracted):
    _, flags = extracted
    assert _run(["features", *flags]) == {"code": 0, "heavy": []}


def test_a_logistic_head_run_imports_no_tensorflow_plots_included(extracted):
    root, flags = extracted
    result = _run(["head", *flags, "--runs-dir", str(root / "runs")])
    assert result == {"code": 0, "heavy": []}
    (run,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    assert {"top_losses.png", "confusion_matrix.png", "report.md", "head.npz"} <= {p.name for p in run.iterdir()}
