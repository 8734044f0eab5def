"""Each option is declared once, in pipeline/config.py: one field, one flag, one Make variable."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.cli import COMMAND_SECTIONS, build_parser, main
from pipeline.config import SECTIONS, FeaturesConfig, HeadConfig
from pipeline.options import derived_fields, nested_fields, options


def _make_option_variables() -> list[str]:
    """The names in the Makefile's `<SECTION>_OPTIONS :=` lists, in order (continuation lines joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    names = []
    for line in text.splitlines():
        match = re.match(r"^([A-Z]+)_OPTIONS :=(.*)$", line)
        if match:
            names += match[2].split()
    return names


def _all_options():
    return [(section, name, opt) for section, cls in SECTIONS.items() for name, opt in options(cls).items()]


def test_every_config_field_is_an_option_a_derived_copy_or_a_section():
    public = {opt.name for _, _, opt in _all_options()}
    for section, cls in SECTIONS.items():
        declared = set(options(cls)) | set(derived_fields(cls)) | set(nested_fields(cls))
        assert {f.name for f in dataclasses.fields(cls)} == declared, section
        for name, source in derived_fields(cls).items():
            assert source in public, f"{section}.{name} copies unknown option {source!r}"
    assert len(public) == len(_all_options())  # no two options share a name


def test_every_option_has_exactly_one_make_variable_and_the_lists_hold_nothing_else():
    variables = _make_option_variables()
    expected = sorted(opt.make_variable for _, _, opt in _all_options())
    assert sorted(variables) == expected


@pytest.mark.parametrize("command", sorted(COMMAND_SECTIONS))
def test_every_option_of_a_command_has_exactly_one_flag(command):
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    actions = commands.choices[command]._actions
    for section in COMMAND_SECTIONS[command]:
        for opt in options(SECTIONS[section]).values():
            matching = [a for a in actions if a.dest == opt.name]
            assert len(matching) == 1 and opt.flag in matching[0].option_strings, (command, opt.name)


def test_flags_fill_every_field_that_records_them():
    args = build_parser().parse_args(
        [
            "finetune",
            "--data-dir",
            "x",
            "--seed",
            "3",
            "--learning-rate",
            "0.01",
            "--dropout",
            "0.5",
            "--head-batch-size",
            "8",
            "--fine-tune-epochs",
            "2",
            "--strict",
            "--no-download",
            "0",
        ]
    )
    from pipeline.cli import config_of
    from pipeline.config import FinetuneConfig

    features, head, tune = config_of(FeaturesConfig, args), config_of(HeadConfig, args), config_of(FinetuneConfig, args)
    assert (features.seed, head.seed, tune.seed) == (3, 3, 3)
    assert (head.learning_rate, tune.head_learning_rate, head.dropout, tune.dropout) == (0.01, 0.01, 0.5, 0.5)
    assert (head.batch_size, tune.epochs, features.strict, features.data.download) == (8, 2, True, True)
    # Unset flags leave the configs' own defaults.
    assert head.epochs == HeadConfig().epochs and features.backbone == FeaturesConfig().backbone


def test_choices_are_checked_once_by_the_config_with_the_make_variable_named(capsys):
    assert main(["head", "--data-dir", "x", "--head", "forest"]) == 2
    err = capsys.readouterr().err
    assert "head must be one of logistic, dense. Received: head='forest' (HEAD)" in err


def test_make_passes_only_the_options_that_are_set():
    done = subprocess.run(
        ["make", "-n", "head", "EPOCHS=5", "DATA_DIR=some dir", "STRICT=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (head,) = [line for line in done.stdout.splitlines() if " -m pipeline" in line and " head " in line]
    assert head.split(" head ", 1)[1].strip() == "--data-dir 'some dir' --strict '1' --epochs '5'"


@pytest.mark.parametrize("target", ["predict", "similar"])
def test_make_passes_images_as_one_argument_whatever_their_spaces_and_quotes(tmp_path, target):
    """The Python side splits it (`expand_images`): a path with spaces stays one path."""
    printer = tmp_path / "argv.py"
    printer.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").touch()  # newer than pyproject.toml: no install
    images = "Camera Roll/ 'it''s.jpg' \"a b.png\" `x` *.jpg"
    done = subprocess.run(
        ["make", "-s", target, f"VENV={tmp_path / 'venv'}", f"PIPELINE={sys.executable} {printer}", f"IMAGES={images}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1])[-1] == images


def test_make_passes_values_with_single_quotes_and_commas_as_they_are(tmp_path):
    """`DATA_DIR="Bob's photos"` was cut at the quote by the shell; SPLITS holds commas."""
    printer = tmp_path / "argv.py"
    printer.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").touch()  # newer than pyproject.toml: no install
    values = {"DATA_DIR": "/data/Bob's photos", "LABELS": "name:^([a-z]+)'s", "CSV": "it's.csv"}
    done = subprocess.run(
        ["make", "-s", "predict", f"VENV={tmp_path / 'venv'}", f"PIPELINE={sys.executable} {printer}"]
        + [f"{k}={v}" for k, v in values.items()]
        + ["FEATURES=x.h5", "SPLITS=train=train[:10%],test=test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    argv = json.loads(done.stdout.strip().splitlines()[-1])
    for flag, value in [("--data-dir", values["DATA_DIR"]), ("--labels", values["LABELS"]), ("--csv", "it's.csv")]:
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--splits") + 1] == "train=train[:10%],test=test"


def test_make_help_lists_every_option_with_its_default_from_the_config():
    done = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for _, _, opt in _all_options():
        assert re.search(rf"^\s+{opt.make_variable}=", done.stdout, re.M), opt.make_variable
    assert re.search(r"^\s+EPOCHS=20\s", done.stdout, re.M) and re.search(r"^\s+HEAD=logistic\s", done.stdout, re.M)
