"""Tests of the backbone registry, the extractor contract and offline weights.

Real architectures are built with weights=None at their minimum size, so nothing
downloads; tests that need the genuine weights in ../shared/assets skip where
those are absent (conftest's `shared_assets`: $PIPELINE_SHARED or ../shared).
Markers: `slow` (large registry entries, run with --runslow), `assets` (real weights).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.backend import config as keras_backend_config

from pipeline.errors import ConfigError, WeightsUnavailableError
from pipeline.features.backbones import (
    BackboneSpec,
    get_backbone,
    list_backbones,
    register_backbone,
    weights_identity,
)
from pipeline.features.extractor import Preprocess, build_extractor

MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
MOBILENET_075_FILE = "mobilenet_7_5_224_tf_no_top.h5"

# Build + one call of a batch of 2 at the minimum size took more than ~2.5 s each
# on 2 CPU cores (up to 6.7 s for efficientnet_v2_l); together they are about 2/3
# of the matrix, so they run only with --runslow.
SLOW_BACKBONES = {
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
    "densenet169",
    "densenet201",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "efficientnet_v2_l",
    "inception_resnet_v2",
    "nasnet_mobile",
    "resnet152",
    "resnet152_v2",
}
REQUIRED_BACKBONES = {
    "mobilenet",
    "mobilenet_075",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "xception",
    "inception_v3",
    "inception_resnet_v2",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50_v2",
    "resnet101_v2",
    "resnet152_v2",
    "densenet121",
    "densenet169",
    "densenet201",
    "vgg16",
    "vgg19",
    "nasnet_mobile",
    "tiny",
    *(f"efficientnet_b{i}" for i in range(8)),
    *(f"efficientnet_v2_{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")),
    *(f"convnext_{v}" for v in ("tiny", "small", "base", "large", "xlarge")),
}


@pytest.fixture
def fresh_keras_session():
    """Frees each model of the registry matrix (up to 1.4 GB) before the next one.

    Not autouse: clear_session costs about 0.2 s, as much as a small test.
    """
    yield
    keras.backend.clear_session()


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty KERAS_HOME with its models/ folder.

    Keras reads KERAS_HOME once, at import, so its resolved home is patched too;
    the folder must exist or Keras falls back to /tmp/.keras.
    """
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(keras_backend_config, "_KERAS_DIR", str(home))
    return home


def _images(size: int, *, seed: int = 0, n: int = 2) -> np.ndarray:
    """(n, size, size, 3) float32 raw pixels in [0, 255)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, size=(n, size, size, 3)).astype("float32")


def _dtype(tensor) -> str:
    return keras.backend.standardize_dtype(tensor.dtype)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _registry_param(name: str):
    marks = [pytest.mark.slow] if name in SLOW_BACKBONES else []
    return pytest.param(name, marks=marks, id=name)


# --- registry ---------------------------------------------------------------


def test_registry_lists_every_required_backbone_sorted():
    names = list_backbones()
    assert names == sorted(names)
    assert REQUIRED_BACKBONES <= set(names)
    assert SLOW_BACKBONES <= set(names)


@pytest.mark.parametrize("name", list_backbones())
def test_spec_is_consistent(name):
    spec = get_backbone(name)
    assert spec.name == name
    assert spec.preprocessing in {"tf", "caffe", "torch", "none"}
    assert 0 < spec.min_size <= spec.default_size
    assert spec.feature_dim > 0


@pytest.mark.parametrize("name", [n for n in list_backbones() if get_backbone(n).pretrained])
def test_spec_preprocessing_matches_its_keras_module(name):
    """Each module's own preprocess_input is the reference (identity for "none")."""
    spec = get_backbone(name)
    module = sys.modules[spec.resolve_builder().__module__]
    x = _images(8)
    expected = module.preprocess_input(x.copy())
    actual = keras.ops.convert_to_numpy(Preprocess(spec.preprocessing)(x))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_unknown_backbone_lists_valid_names():
    pattern = re.escape("Unknown backbone 'foo'. Expected one of: convnext_base, ")
    with pytest.raises(ConfigError, match=pattern) as info:
        get_backbone("foo")
    message = str(info.value)
    assert message.endswith("Received: backbone='foo'.")
    for name in list_backbones():
        assert name in message
    with pytest.raises(ConfigError, match="Unknown backbone 'foo'"):
        build_extractor("foo", image_size=32, weights=None)


def test_register_rejects_duplicates_and_bad_preprocessing():
    with pytest.raises(ConfigError, match="'tiny' is already registered"):
        register_backbone(get_backbone("tiny"))
    bad = BackboneSpec(
        name="not_registered",
        family="Tiny",
        builder=get_backbone("tiny").builder,
        preprocessing="inception",
        default_size=32,
        feature_dim=32,
    )
    with pytest.raises(ConfigError, match="preprocessing='inception'"):
        register_backbone(bad)
    assert "not_registered" not in list_backbones()


# --- extractor contract over the whole registry -------------------------------


@pytest.mark.usefixtures("fresh_keras_session")
@pytest.mark.parametrize("name", [_registry_param(n) for n in list_backbones()])
def test_extractor_matrix(name):
    spec = get_backbone(name)
    size = max(spec.min_size, 32)
    model = build_extractor(name, image_size=size, weights=None)
    features = model(_images(size), training=False)
    assert tuple(features.shape) == (2, spec.feature_dim)
    assert _dtype(features) == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(features)))
    base = model.get_layer("backbone")
    assert not base.trainable
    assert base.trainable_weights == []
    # "none" means the model rescales raw pixels itself; the others must not,
    # or the pixels would be preprocessed twice.
    rescales = any(
        isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) for layer in _all_layers(base)
    )
    assert rescales == (spec.preprocessing == "none")


def test_extractor_layout():
    model = build_extractor("tiny", image_size=32, weights=None, pooling="max")
    assert model.name == "tiny_extractor"
    assert model.input_shape == (None, 32, 32, 3)
    assert [layer.name for layer in model.layers] == [
        "images",
        "preprocess",
        "backbone",
        "pooling",
    ]
    assert _dtype(model.inputs[0]) == "float32"
    assert isinstance(model.get_layer("pooling"), keras.layers.GlobalMaxPooling2D)
    assert model.get_layer("preprocess").mode == "tf"
    bn = [
        layer
        for layer in _all_layers(model.get_layer("backbone"))
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(bn) >= 2


def test_tiny_builds_are_identical():
    x = _images(32)
    first = build_extractor("tiny", image_size=32, weights=None)
    second = build_extractor("tiny", image_size=32, weights=None)
    # Bit-identical by design: seeded initializers, the same batch, the same machine.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(first(x)), keras.ops.convert_to_numpy(second(x)))
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_mixed_precision_keeps_float32_output_and_restores_policy():
    before = keras.config.dtype_policy().name
    model = build_extractor("tiny", image_size=32, weights=None, mixed_precision=True)
    assert keras.config.dtype_policy().name == before
    assert model.get_layer("backbone").get_layer("block1_conv").compute_dtype == ("float16")
    features = model(_images(32))
    assert _dtype(features) == "float32"
    assert tuple(features.shape) == (2, 32)


def test_mixed_precision_policy_restored_after_a_failure():
    def broken_builder(**kwargs):
        raise ValueError("boom")

    spec = BackboneSpec("broken", "Broken", broken_builder, "tf", 32, 8)
    before = keras.config.dtype_policy().name
    with pytest.raises(ConfigError, match="boom"):
        build_extractor(spec, image_size=32, weights=None, mixed_precision=True)
    assert keras.config.dtype_policy().name == before


# --- validation ---------------------------------------------------------------


def test_image_size_below_minimum():
    with pytest.raises(ConfigError, match=r"at least 71x71 .*image_size=70\."):
        build_extractor("xception", image_size=70, weights=None)
    with pytest.raises(ConfigError, match=r"at least 16x16"):
        build_extractor("tiny", image_size=15, weights=None)
    with pytest.raises(ConfigError, match="image_size must be an integer"):
        build_extractor("tiny", image_size=32.0, weights=None)


def test_bad_pooling():
    with pytest.raises(ConfigError, match=r"supports pooling avg, max \(default avg\)\. Received: pooling='sum'"):
        build_extractor("tiny", image_size=32, weights=None, pooling="sum")
    with pytest.raises(ConfigError, match="supports pooling avg, max"):
        build_extractor("tiny", image_size=32, weights=None, pooling="cls")  # a token pooling on a feature map


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "missing.h5"
    with pytest.raises(ConfigError, match=re.escape(repr(str(missing)))):
        build_extractor("mobilenet_v2", image_size=32, weights=str(missing))
    with pytest.raises(ConfigError, match="A weights folder is a keras-hub preset.*takes an .h5 weights file"):
        build_extractor("mobilenet_v2", image_size=32, weights=str(tmp_path))


def test_tiny_has_no_imagenet_weights_but_loads_a_saved_file(tmp_path):
    with pytest.raises(ConfigError, match="'tiny' has no ImageNet weights"):
        build_extractor("tiny", image_size=32, weights="imagenet")
    source = build_extractor("tiny", image_size=32, weights=None).get_layer("backbone")
    source.set_weights([w + 1.0 for w in source.get_weights()])
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = build_extractor("tiny", image_size=32, weights=str(path)).get_layer("backbone")
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_keras_value_errors_become_config_errors():
    """Keras rejects MobileNet ImageNet weights for alpha=0.3 before downloading."""
    spec = BackboneSpec(
        "mobilenet_030",
        "MobileNet",
        keras.applications.MobileNet,
        "tf",
        224,
        307,
        builder_kwargs={"alpha": 0.3},
    )
    with pytest.raises(ConfigError, match="cannot build backbone 'mobilenet_030'"):
        build_extractor(spec, image_size=224, weights="imagenet")


def test_weights_identity(tmp_path):
    assert weights_identity(None) == "none"
    assert weights_identity("imagenet") == "imagenet"
    content = np.random.default_rng(0).bytes(3 * (1 << 19) + 7)  # spans 2 blocks
    path = tmp_path / "weights.h5"
    path.write_bytes(content)
    expected = "sha256:" + hashlib.sha256(content).hexdigest()
    assert weights_identity(str(path)) == expected
    assert weights_identity(path) == expected
    with pytest.raises(ConfigError, match="no such file"):
        weights_identity(str(tmp_path / "missing.h5"))


# --- Preprocess ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_preprocess_matches_keras(mode):
    x = _images(16, n=3)
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode)
    actual = keras.ops.convert_to_numpy(Preprocess(mode)(x))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_preprocess_none_is_identity_and_casts_integers():
    x = _images(8)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(Preprocess("none")(x)), x)
    pixels = np.arange(2 * 4 * 4 * 3, dtype="uint8").reshape(2, 4, 4, 3)
    out = Preprocess("tf")(pixels)
    assert _dtype(out) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), pixels / 127.5 - 1.0, atol=1e-6)


def test_preprocess_rejects_unknown_mode():
    with pytest.raises(ValueError, match="Received: mode='inception'"):
        Preprocess("inception")


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch", "none"])
def test_preprocess_round_trips_through_keras_file(mode, tmp_path):
    inputs = keras.Input(shape=(8, 8, 3))
    x = Preprocess(mode, name="preprocess")(inputs)
    outputs = keras.layers.Conv2D(2, 3, kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("preprocess").mode == mode
    x = _images(8)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-6,
    )


def test_extractor_round_trips_through_keras_file(tmp_path):
    model = build_extractor("tiny", image_size=32, weights=None)
    path = tmp_path / "extractor.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not loaded.get_layer("backbone").trainable
    x = _images(32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-6,
    )


# --- ImageNet weights ------------------------------------------------------------


def test_offline_imagenet_names_the_file_and_folder(keras_home):
    with pytest.raises(WeightsUnavailableError) as info:
        build_extractor("mobilenet_v2", image_size=224, weights="imagenet")
    message = str(info.value)
    assert f"'{MOBILENET_V2_FILE}'" in message
    assert str(keras_home / "models") in message
    assert "WEIGHTS=" in message


def test_offline_imagenet_explains_a_rejected_cached_file(keras_home):
    """Keras deletes a cached file with the wrong hash when re-downloading fails."""
    file_name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    cached = keras_home / "models" / file_name
    cached.write_bytes(b"not the official file")
    with pytest.raises(WeightsUnavailableError, match="its hash differs") as info:
        build_extractor("mobilenet_v3_small", image_size=224, weights="imagenet")
    assert f"'{cached.name}'" in str(info.value)
    assert "Pass WEIGHTS=" in str(info.value)


def _asset(shared_assets: Path, name: str) -> Path:
    path = shared_assets / "weights" / name
    if not path.is_file():
        pytest.skip(f"shared asset {path} is absent")
    return path


def _assert_informative(features, dim: int) -> None:
    features = keras.ops.convert_to_numpy(features)
    assert features.shape == (2, dim)
    assert np.all(np.isfinite(features))
    assert not np.allclose(features[0], features[1])


@pytest.mark.assets
def test_imagenet_from_keras_cache(keras_home, shared_assets):
    asset = _asset(shared_assets, MOBILENET_V2_FILE)
    (keras_home / "models" / MOBILENET_V2_FILE).symlink_to(asset)
    model = build_extractor("mobilenet_v2", image_size=224, weights="imagenet")
    _assert_informative(model(_images(224)), 1280)


@pytest.mark.assets
def test_weights_from_path_at_another_size(shared_assets):
    model = build_extractor(
        "mobilenet_v2",
        image_size=160,
        weights=str(_asset(shared_assets, MOBILENET_V2_FILE)),
    )
    _assert_informative(model(_images(160)), 1280)


@pytest.mark.assets
def test_mobilenet_075_loads_its_asset(shared_assets):
    model = build_extractor(
        "mobilenet_075",
        image_size=224,
        weights=str(_asset(shared_assets, MOBILENET_075_FILE)),
    )
    _assert_informative(model(_images(224)), 768)


def test_offline_imagenet_names_a_broken_symlink(keras_home):
    link = keras_home / "models" / MOBILENET_V2_FILE
    link.symlink_to(keras_home / "nowhere.h5")
    with pytest.raises(WeightsUnavailableError, match="is a broken symbolic link"):
        build_extractor("mobilenet_v2", image_size=224, weights="imagenet")
