"""Training with review decisions: `make head` drops excluded rows, trains relabelled ones with their
new label, changes test rows only with DECISIONS_TEST, and says what it applied; EXCLUDE records
its rows as decisions (one mechanism)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from pipeline.config import HeadConfig
from pipeline.decisions import DecisionStore, read_decisions
from pipeline.errors import ConfigError, LockError
from pipeline.features.store import read_features
from pipeline.heads.train import train_head

CLASSES = ["cat", "dog", "fox"]


def features_of(audit_dir: Path) -> Path:
    return Path(json.loads((audit_dir / "audit.json").read_text())["features"])


def sha(data_dir: Path, rel: str) -> str:
    return hashlib.sha256((data_dir / rel).read_bytes()).hexdigest()


def decide(audit_dir: Path, data_dir: Path, decisions: list[tuple[str, str, str]]) -> Path:
    path = audit_dir.parent / "generated.decisions.csv"
    with DecisionStore(path, CLASSES) as store:
        for rel, decision, label in decisions:
            store.record(sha(data_dir, rel), rel, decision, label)
    return path


def head_config(tmp_path: Path, audit_dir: Path, **kwargs) -> HeadConfig:
    return HeadConfig(runs_dir=str(tmp_path / "runs"), grid_images=0, audit_dir=str(audit_dir.parent), **kwargs)


def test_head_applies_the_datasets_decisions_by_default_and_reports_them(audit_dir, data_dir, tmp_path):
    features = features_of(audit_dir)
    splits = read_features(features).splits
    plain = train_head(features, head_config(tmp_path, audit_dir))
    assert plain.metrics["decisions"] is None
    decide(
        audit_dir,
        data_dir,
        [
            ("train/cat/odd.jpg", "exclude", ""),
            ("train/dog/actually-a-cat.jpg", "relabel", "cat"),
            ("train/fox/fox.0.jpg", "keep", ""),
            ("validation/fox/fox.1.jpg", "exclude", ""),
            ("test/dog/dog.2.jpg", "exclude", ""),
        ],
    )
    run = train_head(features, head_config(tmp_path, audit_dir))
    assert run.run_dir.name.startswith(plain.run_dir.name + "__dec-") and not run.up_to_date
    decided = run.metrics["decisions"]
    assert decided["applied"]["train"] == {"exclude": 1, "relabel": 1}
    assert decided["applied"]["validation"] == {"exclude": 1, "relabel": 0}
    assert decided["applied"]["test"] == {"exclude": 0, "relabel": 0}  # never silently
    assert decided["test_not_applied"] == {"exclude": 1, "relabel": 0} and not decided["test_applied"]
    assert run.metrics["train_examples"] == len(splits["train"]) - 1
    assert run.metrics["validation"]["n"] == len(splits["validation"]) - 1
    assert run.metrics["test"]["n"] == len(splits["test"]) and "test_without_decisions" not in run.metrics
    report = (run.run_dir / "report.md").read_text()
    assert "train 1 excluded, 1 relabelled" in report and "Not applied on test: 1 excluded" in report
    assert train_head(features, head_config(tmp_path, audit_dir)).up_to_date  # same decisions: same run

    with_test = train_head(features, head_config(tmp_path, audit_dir, decisions_test=True))
    assert with_test.run_dir != run.run_dir
    assert with_test.metrics["decisions"]["applied"]["test"] == {"exclude": 1, "relabel": 0}
    assert with_test.metrics["test"]["n"] == len(splits["test"]) - 1
    assert with_test.metrics["test_without_decisions"]["n"] == len(splits["test"])
    assert "Test accuracy with the decisions" in (with_test.run_dir / "report.md").read_text()

    off = train_head(features, head_config(tmp_path, audit_dir, decisions="none"))
    assert off.run_dir == plain.run_dir and off.metrics["decisions"] is None


def test_a_relabelled_row_trains_with_its_new_label(audit_dir, data_dir, tmp_path):
    features = features_of(audit_dir)
    path = decide(audit_dir, data_dir, [("train/dog/dog.0.jpg", "relabel", "fox")])
    from pipeline.decisions import apply_to_splits

    train = read_features(features).splits["train"]
    digests = [sha(data_dir, str(i)) for i in train.ids]
    applied = apply_to_splits(path, read_decisions(path), {"train": (digests, train.labels)}, CLASSES)
    row = list(train.ids).index("train/dog/dog.0.jpg")
    assert applied.labels["train"][row] == CLASSES.index("fox") and applied.keep["train"].all()
    run = train_head(features, head_config(tmp_path, audit_dir, decisions=str(path)))
    assert run.metrics["decisions"]["applied"]["train"] == {"exclude": 0, "relabel": 1}


def test_stale_decisions_warn_with_a_count_and_never_crash(audit_dir, data_dir, tmp_path, caplog):
    features = features_of(audit_dir)
    path = decide(audit_dir, data_dir, [("train/cat/cat.1.jpg", "exclude", "")])
    with open(path, "a") as f:  # a hand edit: an image that no longer exists, a class that does not exist
        f.write(f"{'a' * 64},train/cat/deleted.jpg,exclude,,\n")
        f.write(f"{sha(data_dir, 'train/dog/dog.3.jpg')},train/dog/dog.3.jpg,relabel,wolf,\n")
    with caplog.at_level(logging.WARNING):
        run = train_head(features, head_config(tmp_path, audit_dir))
    decided = run.metrics["decisions"]
    assert decided["unknown_images"] == 1 and decided["unknown_classes"] == 1
    assert decided["applied"]["train"] == {"exclude": 1, "relabel": 0}
    assert "1 decisions name images these rows do not hold" in caplog.text
    assert "1 relabel decisions name classes the features do not have (wolf)" in caplog.text


def test_an_explicit_decisions_file_must_exist(audit_dir, tmp_path):
    with pytest.raises(ConfigError, match="DECISIONS must name a decisions file of `make review`"):
        train_head(features_of(audit_dir), head_config(tmp_path, audit_dir, decisions=str(tmp_path / "typo.csv")))


def test_exclude_records_its_rows_as_decisions_which_a_person_can_override(audit_dir, data_dir, tmp_path):
    features = features_of(audit_dir)
    record = json.loads((audit_dir / "audit.json").read_text())
    flagged = {i for c in record["clusters"] for i in c["exclude"]}
    assert flagged == {"train/cat/cat.0.jpg", "train/fox/fox.3.jpg", "train/dog/dog.1.jpg"}
    path = decide(audit_dir, data_dir, [("train/fox/fox.3.jpg", "keep", "")])  # a person looked: it stays
    config = head_config(tmp_path, audit_dir, exclude=str(audit_dir / "audit.json"), exclude_kinds="duplicates")
    run = train_head(features, config)
    saved = {d.path: d.decision for d in read_decisions(path).values()}
    # dog.1.jpg is byte-identical to dog.1-copy.jpg, which the audit keeps: a decision names content, so
    # excluding it would drop both copies; it is left alone.
    assert saved == {"train/fox/fox.3.jpg": "keep", "train/cat/cat.0.jpg": "exclude"}
    assert run.metrics["decisions"]["applied"]["train"] == {"exclude": 1, "relabel": 0}
    assert run.metrics["decisions"]["test_not_applied"] == {"exclude": 1, "relabel": 0}  # cat.0's copy in test
    # The decisions file now holds what EXCLUDE did: the same run without EXCLUDE is the same run.
    assert train_head(features, head_config(tmp_path, audit_dir)).run_dir == run.run_dir
    with pytest.raises(ConfigError, match="EXCLUDE records its rows as decisions, and DECISIONS=none"):
        head_config(tmp_path, audit_dir, exclude="a.json", decisions="none")


def test_exclude_while_the_page_is_open_is_a_one_line_error(audit_dir, tmp_path):
    from pipeline.review.server import running

    config = head_config(tmp_path, audit_dir, exclude=str(audit_dir / "audit.json"))
    with running(audit_dir):
        with pytest.raises(LockError, match="in use by another process") as err:
            train_head(features_of(audit_dir), config)
    assert "\n" not in str(err.value)


def test_rerunning_the_audit_keeps_the_decisions(audit_dir, data_dir):
    from pipeline.audit.findings import audit_features
    from pipeline.config import AuditConfig

    path = decide(audit_dir, data_dir, [("train/cat/odd.jpg", "exclude", "")])
    again = audit_features(features_of(audit_dir), AuditConfig(audit_dir=str(audit_dir.parent), top=0, folds=3, C=1.0))
    assert again.out_dir == audit_dir and (audit_dir / "audit.json").exists()
    assert [d.path for d in read_decisions(path).values()] == ["train/cat/odd.jpg"]
