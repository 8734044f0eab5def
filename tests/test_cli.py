"""The command line: help for every command, and flags turned into validated configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_folder

from pipeline.cli import build_parser, config_of, main
from pipeline.config import FeaturesConfig


def commands() -> list[str]:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(subparsers.choices)


@pytest.mark.parametrize("command", commands())
def test_every_command_has_working_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_splits_flag_parses_into_the_config():
    args = build_parser().parse_args(["features", "--splits", "train=train[:80%],validation=train[80%:]"])
    config = config_of(FeaturesConfig, args)
    assert config.data.splits == {"train": "train[:80%]", "validation": "train[80%:]"}


def test_bad_splits_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--splits", "training=train"])
    assert exit_info.value.code == 2
    assert "NAME one of train, validation, test" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["features", "--dataset", "x", "--data-dir", "y"], "not both"),
        (["features", "--backbone", "nope", "--weights", "none"], "Unknown backbone 'nope'. Expected one of:"),
        (["features", "--data-dir", "y", "--splits", "train=train"], "--splits slices tfds datasets"),
        (["features", "--num-shards", "2", "--shard", "2"], "Expected 0 <= shard < num_shards"),
        (["predict", "--run", "nowhere"], "predict needs images"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "line, kept",
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", False),
        ("I0000 00:00:1796056469.364410   21895 port.cc:153] oneDNN custom operations are on.", False),
        ("W0000 00:00:1796056469.364410   21895 loop.cc:12] Local rendezvous is aborting", False),
        (
            "E0000 00:00:1796056474.418383   21895 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
            False,
        ),
        (
            "E0000 00:00:1796058219.817058    5657 util.cc:131] oneDNN supports DT_UINT8 only on platforms "
            "with AVX-512.",
            False,
        ),
        (
            "E0000 00:00:1796502429.759305    2296 jpeg_mem.cc:331] Premature end of JPEG data. Stopped at line 78/374",
            False,
        ),
        ("E1130 16:40:01.000001   21895 gpu_device.cc:9] Resource exhausted: OOM when allocating tensor", True),
        ("F1130 16:40:01.000001   21895 check.cc:9] Check failed: x", True),
        ("error: Image folder not found", True),
        ("train:  50%|#####     | 8/16", True),
    ],
)
def test_native_tensorflow_logs_are_filtered_but_real_errors_kept(line, kept):
    from pipeline.quiet import keep_line

    assert keep_line(line) is kept


def _tiny_folder(root):
    from conftest import make_folder

    return make_folder(root / "images", 10)


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_commands_print_no_tensorflow_start_up_chatter_unless_verbose(tmp_path, verbose):
    """A new user's terminal shows our lines only; VERBOSE=1 (--verbose) shows TensorFlow's own too."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    folder = _tiny_folder(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        *(["--verbose"] if verbose else []),
        "features",
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--output-dir",
        str(tmp_path / "f"),
        "--no-progress",
    ]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("features: 20 extracted, 0 reused")
    assert "INFO pipeline.features.extractor: Built tiny_extractor" in done.stderr
    native = [
        line
        for line in done.stderr.splitlines()
        if "absl::InitializeLog" in line or line[:1] in "IWE" and line[1:5].isdigit()
    ]
    if verbose:
        assert native and "DEBUG" in done.stderr
    else:
        assert native == [], native


def test_an_audit_prints_no_faiss_loader_chatter(tmp_path):
    """faiss logs, at INFO, every CPU build it fails to load before the one it uses."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    common = ["--data-dir", str(_tiny_folder(tmp_path)), "--backbone", "tiny", "--weights", "none"]
    common += ["--output-dir", str(tmp_path / "f"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in (["features"], ["audit", "--audit-dir", str(tmp_path / "audit")]):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *command, *common],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit: 20 rows") and "faiss" not in done.stderr, done.stderr


_KERAS_PROBE = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
loaded = {m: m in sys.modules for m in ("tensorflow", "sklearn", "matplotlib")}
import sklearn.linear_model  # the tool's own imports still get both
import matplotlib.figure
print(json.dumps({"code": code, **loaded}))
"""


def test_keras_is_imported_without_scikit_learn_or_matplotlib_which_stay_importable(tmp_path):
    """Keras's optional scikit-learn wrappers and plotting helpers would import both (1.2 s)
    in every TensorFlow command."""
    folder = make_folder(tmp_path / "images", 4, layout="presplit")
    flags = [
        "features",
        "--data-dir",
        str(folder),
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--features-dir",
        str(tmp_path / "features"),
        "--no-progress",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _KERAS_PROBE, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "code": 0,
        "tensorflow": True,
        "sklearn": False,
        "matplotlib": False,
    }
