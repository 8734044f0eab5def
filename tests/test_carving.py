"""Carving splits out of train: exact per-class quotas of a seeded ranking, stable as the folder grows."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.features.carving import carve, quotas
from pipeline.features.sources import scan_folder

TWO = {"names": ("test", "validation", "train"), "class_names": ("cat", "dog")}
ONE = {"names": ("validation", "train"), "class_names": ("cat", "dog")}


def _where(parts) -> dict[str, int]:
    return {entry[0]: k for k, part in enumerate(parts) for entry in part}


def _crossings(before: dict[str, int], after: dict[str, int], boundary: int) -> int:
    """Earlier entries that moved across `boundary` (between parts < boundary and parts >= boundary)."""
    return sum((before[p] < boundary) != (after[p] < boundary) for p in before)


def _touch(root, paths) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")  # the carve reads names only


def _folder_config(root, **kwargs) -> DataConfig:
    return DataConfig(dataset=None, data_dir=str(root), **kwargs)


@pytest.mark.parametrize("fractions", [(0.2,), (0.1, 0.1), (0.15, 0.3)])
def test_adding_k_images_to_a_class_moves_at_most_k_earlier_images_across_each_boundary(fractions):
    rng = random.Random(len(fractions))
    kwargs = TWO if len(fractions) == 2 else ONE
    for _ in range(300):
        n, k, seed = rng.randint(8, 80), rng.randint(1, 6), rng.randint(0, 9)
        old = [(f"cat/{i:03d}.jpg", 0) for i in range(n)]
        new = sorted(old + [(f"cat/new-{rng.random()}.jpg", 0) for _ in range(k)])
        before = _where(carve(old, fractions, seed, **kwargs))
        after = _where(carve(new, fractions, seed, **kwargs))
        for boundary in range(1, len(fractions) + 1):
            assert _crossings(before, after, boundary) <= k
        assert sum(before[p] != after[p] for p in before) <= k * len(fractions)


def test_per_class_counts_are_exact_quotas_rounded_half_up():
    entries = [(f"cat/{i}.jpg", 0) for i in range(15)] + [(f"dog/{i}.jpg", 1) for i in range(14)]
    test, validation, train = carve(entries, (0.1, 0.1), 0, **TWO)
    parts = zip(TWO["names"], (test, validation, train))
    count = {name: [sum(e[1] == c for e in part) for c in (0, 1)] for name, part in parts}
    assert count == {"test": [2, 1], "validation": [1, 2], "train": [12, 11]}
    assert quotas(15, (0.1, 0.1)) == [2, 3] and quotas(14, (0.1, 0.1)) == [1, 3] and quotas(10, (0.25,)) == [3]
    assert quotas(5, (0.7,)) == [4]  # half up, though 0.7 * 5 is 3.4999999999999996
    assert quotas(6, (0.1, 0.1)) == [1, 2] and quotas(2, (0.1, 0.1)) == [1, 1]  # one each while train keeps one
    assert quotas(6, (0.0, 0.1)) == [0, 1]
    # 14 -> 15 images: test's quota grows while validation's shrinks, so a new image ranked into
    # validation forces two earlier ones out of it: "at most k" holds per boundary, not overall.


def test_the_carve_keeps_each_splits_order_and_depends_on_seed_and_fractions():
    entries = [(f"{c}/{i:02d}.jpg", label) for label, c in enumerate(("cat", "dog")) for i in range(30)]
    parts = carve(entries, (0.1, 0.2), 4, **TWO)
    assert all(part == sorted(part) for part in parts) and sorted(sum(parts, [])) == entries
    assert carve(entries, (0.1, 0.2), 4, **TWO) == parts
    assert carve(entries, (0.1, 0.2), 5, **TWO) != parts
    assert carve(entries, (0.2, 0.1), 4, **TWO) != parts
    assert _where(carve(entries[::-1], (0.1, 0.2), 4, **TWO)) == _where(parts)  # a function of the set
    assert carve(entries, (0.0, 0.0), 4, **TWO) == [[], [], entries]


def test_adding_images_to_a_flat_folder_moves_few_earlier_images_and_no_other_class(tmp_path):
    root = tmp_path / "flat"
    _touch(root, [f"{c}/{c}.{i:02d}.jpg" for c in ("cat", "dog", "fox") for i in range(40)])
    config = _folder_config(root, val_fraction=0.2, test_fraction=0.1)
    before = scan_folder(config, seed=1)
    _touch(root, [f"cat/new.{i}.jpg" for i in range(3)])
    after = scan_folder(config, seed=1)
    old, new = _where(before.splits.values()), _where(after.splits.values())
    assert {p for p in old if not p.startswith("cat/") and old[p] != new[p]} == set()
    moved = [p for p in old if old[p] != new[p]]
    assert len(moved) <= 2 * 3, moved
    cats = {split: sum(p.startswith("cat/") for p, _ in entries) for split, entries in after.splits.items()}
    assert cats == {"train": 30, "validation": 9, "test": 4}  # 43 images: round(4.3) test, round(12.9) - 4 validation


def test_moving_an_image_between_classes_changes_only_those_two_classes_a_little(tmp_path):
    root = tmp_path / "train-only"
    _touch(root, [f"train/{c}/{c}.{i:02d}.jpg" for c in ("cat", "dog", "fox") for i in range(30)])
    config = _folder_config(root, val_fraction=0.2, test_fraction=0.2)
    before = _where(scan_folder(config, seed=0).splits.values())
    os.rename(root / "train/cat/cat.07.jpg", root / "train/dog/cat.07.jpg")
    after = _where(scan_folder(config, seed=0).splits.values())
    changed = {p for p in before if p in after and before[p] != after[p]}
    assert not {p for p in changed if p.startswith("train/fox/")}
    assert len({p for p in changed if p.startswith("train/cat/")}) <= 2  # one image fewer: one per boundary at most
    assert len({p for p in changed if p.startswith("train/dog/")}) <= 2  # one image more: likewise


def test_test_from_validation_carves_a_per_class_quota_of_validation(tmp_path):
    root = tmp_path / "tv"
    _touch(root, [f"{s}/{c}/{c}.{i}.jpg" for s in ("train", "validation") for c in ("cat", "dog") for i in range(10)])
    scan = scan_folder(_folder_config(root, test_from_validation=0.3), seed=0)
    assert {s: len(e) for s, e in scan.splits.items()} == {"train": 20, "validation": 14, "test": 6}
    assert all(p.startswith("validation/") for p, _ in scan.splits["test"])
    assert scan_folder(_folder_config(root, test_from_validation=0.3), seed=1).splits["test"] != scan.splits["test"]
    with pytest.raises(DataError, match=r"Cannot carve 95% test from class 'cat' \(10 images\): .* validation"):
        scan_folder(_folder_config(root, test_from_validation=0.95), seed=0)


def test_carving_a_changed_folder_imports_no_scikit_learn(tmp_path):
    root = tmp_path / "flat"
    _touch(root, [f"{c}/{i}.jpg" for c in ("cat", "dog") for i in range(20)])
    code = (
        "import sys\n"
        "from pipeline.config import DataConfig\n"
        "from pipeline.features.sources import scan_folder\n"
        f"scan = scan_folder(DataConfig(dataset=None, data_dir={str(root)!r}), seed=0)\n"
        "print(sorted(map(len, scan.splits.values())), 'sklearn' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["[4,", "4,", "32]", "False"], done.stderr[-2000:]
