"""decisions.csv: latest row wins, durable per click, survives crashes and hand edits, one writer."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from pipeline.decisions import (
    COLUMNS,
    Decision,
    DecisionStore,
    apply_decisions,
    decision_counts,
    decisions_fingerprint,
    read_decisions,
)
from pipeline.errors import ConfigError, LockError

CLASSES = ["cat", "dog", "fox"]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_latest_row_per_image_wins_and_survives_reopening(tmp_path):
    path = tmp_path / "decisions.csv"
    with DecisionStore(path, CLASSES) as store:
        store.record(sha("a"), "train/cat/a.jpg", "exclude")
        store.record(sha("b"), "train/dog/b.jpg", "relabel", "cat")
        store.record(sha("a"), "train/cat/a.jpg", "keep")  # changed my mind
        store.record(sha("c"), "train/fox/c.jpg", "exclude")
        store.record(sha("c"), "train/fox/c.jpg", "undecided")  # taken back
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert len(path.read_text().splitlines()) == 6  # append-only: every click is a row
    with DecisionStore(path, CLASSES) as again:
        got = again.current()
    assert {s: (d.decision, d.label) for s, d in got.items()} == {
        sha("a"): ("keep", ""),
        sha("b"): ("relabel", "cat"),
        sha("c"): ("undecided", ""),
    }
    assert decision_counts(got) == {"keep": 1, "exclude": 0, "relabel": 1, "undecided": 1}


def test_a_half_written_last_row_is_skipped_and_the_next_row_starts_on_its_own_line(tmp_path, caplog):
    path = tmp_path / "decisions.csv"
    with DecisionStore(path, CLASSES) as store:
        store.record(sha("a"), "train/cat/a.jpg", "exclude")
    with open(path, "a") as f:  # the process died mid-write
        f.write(f"{sha('b')},train/dog/b.jpg,rel")
    with caplog.at_level(logging.WARNING), DecisionStore(path, CLASSES) as store:
        assert set(store.current()) == {sha("a")}
        store.record(sha("c"), "train/fox/c.jpg", "relabel", "dog")
    assert "skipped 1 unusable rows (lines 3)" in caplog.text
    lines = path.read_text().splitlines()
    assert lines[2].endswith(",rel") and lines[3].startswith(sha("c"))
    assert set(read_decisions(path)) == {sha("a"), sha("c")}


def test_hand_edits_bad_rows_are_skipped_a_bad_header_is_one_clear_error(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text(
        "sha256,path,decision,label,time\n"
        f"{sha('a')},a.jpg,exclude,,\n"
        f"{sha('b')},b.jpg,delete,,\n"  # no such decision
        f"{sha('c')},c.jpg,relabel,,\n"  # relabel to nothing
        "not-a-hash,d.jpg,keep,,\n"
        f'{sha("e")},"e, with comma.jpg",relabel,dog,2024-01-01\n'
    )
    assert {s: d.decision for s, d in read_decisions(path).items()} == {sha("a"): "exclude", sha("e"): "relabel"}
    path.write_text("hash,file,what\n")
    with pytest.raises(ConfigError, match="expected the header sha256,path,decision,label,time; columns sha256, path"):
        read_decisions(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (("not-hex", "x.jpg", "keep"), "64 lowercase hex"),
        ((sha("a"), "x.jpg", "delete"), "Expected decision in keep, exclude, relabel, undecided"),
        ((sha("a"), "x.jpg", "relabel"), "needs a label"),
        ((sha("a"), "x.jpg", "relabel", "wolf"), "Expected a label in the classes cat, dog, fox. Received: 'wolf'"),
        ((sha("a"), "x.jpg", "exclude", "cat"), "Only relabel takes a label"),
    ],
)
def test_decisions_that_cannot_be_stored_are_refused_in_one_line(tmp_path, args, message):
    with DecisionStore(tmp_path / "decisions.csv", CLASSES) as store:
        with pytest.raises(ConfigError, match=message) as err:
            store.record(*args)
        assert "\n" not in str(err.value)
        assert store.current() == {}


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    path = tmp_path / "decisions.csv"
    with DecisionStore(path, CLASSES):
        with pytest.raises(LockError, match=r"in use by another process \(PID \d+") as err:
            DecisionStore(path, CLASSES).open()
        assert "\n" not in str(err.value)
    with DecisionStore(path, CLASSES):  # released on close
        pass


def test_apply_counts_rows_and_warns_about_unknown_images_and_classes(caplog):
    decisions = {
        sha("a"): Decision(sha("a"), "a.jpg", "exclude"),
        sha("b"): Decision(sha("b"), "b.jpg", "relabel", "fox"),
        sha("c"): Decision(sha("c"), "c.jpg", "keep"),
        sha("gone"): Decision(sha("gone"), "gone.jpg", "exclude"),
        sha("old"): Decision(sha("old"), "old.jpg", "relabel", "wolf"),
        sha("back"): Decision(sha("back"), "back.jpg", "undecided"),
    }
    digests = [sha("a"), sha("b"), sha("c"), sha("a"), None, sha("old"), sha("untouched")]
    labels = [0, 1, 2, 0, 1, 1, 2]
    with caplog.at_level(logging.WARNING):
        applied = apply_decisions(decisions, digests, labels, CLASSES)
    np.testing.assert_array_equal(applied.keep, [False, True, True, False, True, True, True])  # both copies of a
    np.testing.assert_array_equal(applied.labels, [0, 2, 2, 0, 1, 1, 2])
    assert applied.counts == {"exclude": 2, "relabel": 1, "keep": 1}
    assert (applied.unknown_images, applied.unknown_classes, applied.rows_without_digest) == (1, 1, 1)
    assert len(applied.warnings) == 3 and "gone.jpg" in applied.warnings[0] and "wolf" in applied.warnings[1]
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3


def test_the_fingerprint_changes_with_what_training_would_do_only():
    a = {sha("a"): Decision(sha("a"), "a.jpg", "exclude", "", "2024-01-01T00:00:00")}
    same = {**a, sha("b"): Decision(sha("b"), "b.jpg", "keep")}  # looked at, changed nothing
    moved = {sha("a"): Decision(sha("a"), "elsewhere/a.jpg", "exclude", "", "2025-01-01T00:00:00")}
    other = {sha("a"): Decision(sha("a"), "a.jpg", "relabel", "dog")}
    assert decisions_fingerprint(a) == decisions_fingerprint(same) == decisions_fingerprint(moved)
    assert decisions_fingerprint(a) != decisions_fingerprint(other) != decisions_fingerprint({})
