"""Shared fixtures: tiny image folders written on the fly, and the real assets' paths.

Real assets live in ../shared/assets beside the project (override with the
PIPELINE_SHARED environment variable or --shared); tests that need them skip when
they are absent, as they are on a user's machine.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--shared",
        default=os.environ.get("PIPELINE_SHARED", str(ROOT.parent / "shared")),
        help="folder holding assets/ (default: ../shared or $PIPELINE_SHARED)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_assets(pytestconfig) -> Path:
    """../shared/assets, or skip the test when it is absent."""
    assets = Path(pytestconfig.getoption("--shared")).resolve() / "assets"  # absolute: tests symlink to it
    if not assets.is_dir():
        pytest.skip(f"real assets not found at {assets}")
    return assets


def write_image(path: Path, color, size=(24, 20), fmt=None, mode="RGB", seed=0) -> Path:
    """Writes a noisy image whose mean colour is `color`: classes stay separable."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(color, float) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


COLORS = {"cat": (200, 60, 60), "dog": (60, 60, 200), "fox": (60, 200, 60)}


def make_folder(root: Path, per_class: int, classes=("cat", "dog"), layout="flat") -> Path:
    """A class-per-folder tree of small JPEGs; `layout="presplit"` adds train/validation/test."""
    splits = {"train": per_class, "validation": max(2, per_class // 2), "test": max(2, per_class // 2)}
    for c_index, name in enumerate(classes):
        if layout == "flat":
            for i in range(per_class):
                write_image(root / name / f"{name}.{i}.jpg", COLORS[name], seed=c_index * 10_000 + i)
        else:
            for split, n in splits.items():
                for i in range(n):
                    write_image(
                        root / split / name / f"{name}.{i}.jpg",
                        COLORS[name],
                        seed=zlib.crc32(f"{split}/{name}/{i}".encode()),
                    )
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Two classes of 12 JPEGs each, no split sub-folders."""
    return make_folder(tmp_path / "images", 12)


@pytest.fixture
def presplit_folder(tmp_path) -> Path:
    """train/validation/test sub-folders with two classes, like cats_and_dogs_filtered."""
    return make_folder(tmp_path / "presplit", 8, layout="presplit")


@pytest.fixture(scope="session")
def dummy_tfds_dir(tmp_path_factory) -> Path:
    """A real, prepared tfds dataset (`dummy_mnist`: 20 train + 20 test images of 28x28x1,
    generated locally by tfds's test builder), so the tfds path runs without a network."""
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.testing.DummyMnist(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


@pytest.fixture(scope="session")
def real_features(shared_assets, tmp_path_factory):
    """`get(size)` -> path of MobileNetV2 ImageNet features of cats_and_dogs_filtered at
    `size` px, extracted once per session (the slow part of the real-asset tests)."""
    from pipeline.config import DataConfig, FeaturesConfig
    from pipeline.features.extract import extract_features

    out = tmp_path_factory.mktemp("real-features")
    weights = shared_assets / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    data = DataConfig(dataset=None, data_dir=str(shared_assets / "datasets" / "cats_and_dogs_filtered"))
    done = {}

    def get(size: int):
        if size not in done:
            config = FeaturesConfig(data=data, weights=str(weights), image_size=size, output_dir=str(out))
            done[size] = (config, extract_features(config, progress=False))
        return done[size]

    return get


@pytest.fixture(autouse=True, scope="module")
def _fresh_keras_session():
    """Each test module starts from a clean Keras state: models built by earlier tests pile up in
    Keras' global state and slow later builds and traces (a fine-tuning test took 3 s alone and
    20 s late in the suite). Per module, not per test: clearing costs time too."""
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()


def assert_same_rows(got, want, *, exact: bool = False) -> None:
    """Two feature files hold the same rows: ids, labels and order exactly; features to float
    rounding (other batch compositions round differently), or bit for bit with `exact`."""
    assert got.key == want.key
    for name, split in want.splits.items():
        other = got.splits[name]
        np.testing.assert_array_equal(other.ids, split.ids)
        np.testing.assert_array_equal(other.labels, split.labels)
        np.testing.assert_array_equal(other.index, split.index)
        if exact:
            np.testing.assert_array_equal(other.features, split.features)
        else:
            np.testing.assert_allclose(other.features, split.features, atol=1e-5)


# ---------------------------------------------------------------- the review page's audited fixture
@pytest.fixture(scope="session")
def built_audit(tmp_path_factory) -> Path:
    """A real audit of a tiny generated image folder (tests/review_fixture.py), built once per session;
    read-only for tests: copy it, see `audit_dir`."""
    from review_fixture import build_audit

    return build_audit(tmp_path_factory.mktemp("review"))


@pytest.fixture
def audit_dir(built_audit, tmp_path) -> Path:
    """A fresh copy of the audit folder per test, in tmp_path/audit/ where its decisions file goes."""
    import shutil

    return Path(shutil.copytree(built_audit, tmp_path / "audit" / built_audit.name))


@pytest.fixture
def data_dir(built_audit) -> Path:
    return built_audit.parents[1] / "images"
