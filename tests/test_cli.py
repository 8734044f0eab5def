"""The command line: help for every command, and flags turned into validated configs."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, features_config, main


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
    config = features_config(args)
    assert config.data.splits == {"train": "train[:80%]", "validation": "train[80%:]"}


def test_bad_splits_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--splits", "training=train"])
    assert exit_info.value.code == 2
    assert "NAME one of train, validation, test" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["features", "--dataset", "x", "--data-dir", "y"], "not both"),
    (["features", "--backbone", "nope", "--weights", "none"], "Unknown backbone 'nope'. Expected one of:"),
    (["features", "--data-dir", "y", "--splits", "train=train"], "--splits slices tfds datasets"),
    (["features", "--num-shards", "2", "--shard", "2"], "Expected 0 <= shard < num_shards"),
    (["predict", "--run", "nowhere"], "predict needs images"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
