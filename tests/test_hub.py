"""keras-hub presets as backbones: tiny random-init DINOv2, CLIP and SigLIP towers saved with save_to_preset.

Nothing downloads: each preset is written to a temporary folder and loaded through
WEIGHTS=<folder>, the offline route. Skips where keras-hub is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, make_folder

keras_hub = pytest.importorskip("keras_hub")

from pipeline.cli import main  # noqa: E402
from pipeline.errors import ConfigError, WeightsUnavailableError  # noqa: E402
from pipeline.features.backbones import get_backbone, weights_identity  # noqa: E402
from pipeline.features.extractor import build_extractor  # noqa: E402
from pipeline.finetune.model import block_starts, resolve_fine_tune_at, unfreeze  # noqa: E402
from pipeline.images import Resize  # noqa: E402

SIZE = 32
TOWER = dict(patch_size=8, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(SIZE, SIZE, 3))
# ImageNet mean and std as keras-hub converters store them: scale = 1 / (255 std), offset = -mean / std.
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
FAMILIES = {
    "dinov2": (
        lambda: keras_hub.models.DINOV2Backbone(**TOWER, position_embedding_shape=(SIZE, SIZE, 3)),
        keras_hub.layers.DINOV2ImageConverter,
        "cls_mean",
        32,
    ),
    "clip": (lambda: keras_hub.models.CLIPVisionEncoder(**TOWER), keras_hub.layers.CLIPImageConverter, "cls", 16),
    "siglip": (
        lambda: keras_hub.models.SigLIPVisionEncoder(**TOWER),
        keras_hub.layers.SigLIPImageConverter,
        "pooled",
        16,
    ),
}


def save_tiny_preset(family: str, folder) -> str:
    """A random-init image tower and its image converter, saved as a keras-hub preset."""
    build, converter, _, _ = FAMILIES[family]
    build().save_to_preset(str(folder))
    scale, offset = (1 / (255 * STD)).tolist(), (-MEAN / STD).tolist()
    converter(image_size=(SIZE, SIZE), scale=scale, offset=offset, interpolation="bicubic").save_to_preset(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return {family: save_tiny_preset(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_spec_comes_from_the_presets_own_config(presets, family):
    spec = get_backbone(f"hub:{family}_tiny", presets[family])
    _, _, pooling, width = FAMILIES[family]
    assert (spec.default_size, spec.feature_dim, spec.default_pooling) == (SIZE, 16, pooling)
    assert spec.pooled_dim(None) == width
    np.testing.assert_allclose(spec.builder_kwargs["offset"], -MEAN / STD)
    # keras-hub's ImageConverter crops to the aspect ratio unless told not to; the preset says bicubic
    assert spec.resize(SIZE) == Resize(SIZE, "bicubic", crop_to_aspect_ratio=True)
    model = build_extractor(spec, image_size=SIZE, weights=presets[family])
    assert model.output_shape == (None, width)
    rescale = model.get_layer("backbone").get_layer("preset_rescale")
    out = np.asarray(rescale(np.full((1, 2, 2, 3), 255 * MEAN, np.float32)))
    np.testing.assert_allclose(out, 0, atol=1e-5)  # the preset's mean maps to 0


def test_token_poolings_and_their_widths(presets):
    spec = get_backbone("hub:dinov2_tiny", presets["dinov2"])
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    out = {
        p: build_extractor(spec, image_size=SIZE, weights=presets["dinov2"], pooling=p)(images) for p in spec.poolings
    }
    assert {p: tuple(v.shape) for p, v in out.items()} == {"cls": (2, 16), "mean": (2, 16), "cls_mean": (2, 32)}
    np.testing.assert_allclose(out["cls_mean"], np.concatenate([out["cls"], out["mean"]], axis=1), atol=1e-5)
    with pytest.raises(ConfigError, match="supports pooling cls, mean, cls_mean"):
        build_extractor(spec, image_size=SIZE, weights=presets["dinov2"], pooling="avg")


def test_fixed_size_towers_refuse_another_size_dinov2_interpolates(presets):
    with pytest.raises(ConfigError, match="position embeddings for 32 px only"):
        build_extractor("hub:clip_tiny", image_size=48, weights=presets["clip"])
    assert build_extractor("hub:dinov2_tiny", image_size=48, weights=presets["dinov2"]).output_shape == (None, 32)


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_blocks_count_transformer_blocks_and_layernorm_models_unfreeze(presets, family):
    backbone = build_extractor(f"hub:{family}", image_size=SIZE, weights=presets[family]).get_layer("backbone")
    assert len(block_starts(backbone)) == 2
    unfreeze(backbone, resolve_fine_tune_at(backbone, "blocks:1"))
    trainable = {id(v) for v in backbone.trainable_weights}
    assert 0 < len(trainable) < len(backbone.weights)


def test_a_preset_folder_is_identified_by_its_content(presets, tmp_path):
    copy = save_tiny_preset("clip", tmp_path / "other")
    assert weights_identity(presets["dinov2"]).startswith("sha256:")
    assert weights_identity(presets["clip"]) != weights_identity(copy)  # other random weights


def test_offline_without_a_local_preset_is_one_line_within_10_seconds():
    started = time.monotonic()
    with pytest.raises((WeightsUnavailableError, ConfigError)) as info:
        get_backbone("hub:dinov2_small", "imagenet")
    assert time.monotonic() - started < 10
    message = str(info.value)
    if isinstance(info.value, WeightsUnavailableError):  # offline, and not in keras-hub's cache
        assert "\n" not in message and "dinov2_small" in message and "WEIGHTS=DIR" in message
        assert "network" in message


def test_a_folder_that_is_not_a_preset_and_a_preset_for_a_keras_applications_backbone(presets, tmp_path):
    with pytest.raises(ConfigError, match="must be a keras-hub preset folder"):
        get_backbone("hub:x", str(tmp_path))
    with pytest.raises(ConfigError, match="A weights folder is a keras-hub preset"):
        build_extractor("tiny", image_size=32, weights=presets["clip"])


@pytest.mark.parametrize("family", FAMILIES)
def test_features_head_audit_finetune_export_predict(presets, family, tmp_path, capsys):
    folder = make_folder(tmp_path / "images", 8, classes=("cat", "dog"))
    common = [
        *("--data-dir", str(folder), "--backbone", f"hub:{family}_tiny", "--weights", presets[family]),
        *("--val-fraction", "0.25", "--test-fraction", "0.25", "--features-dir", str(tmp_path / "features")),
        "--no-progress",
    ]
    head = [*common, "--runs-dir", str(tmp_path / "runs"), "--grid-images", "0"]
    assert main(["features", *common, "--aug-views", "1"]) == 0
    path = capsys.readouterr().out
    assert main(["features", *common, "--print-path"]) == 0
    file_name = capsys.readouterr().out.strip()
    assert f"hub-{family}_tiny" in file_name and FAMILIES[family][2] in file_name, path
    assert main(["head", *head]) == 0
    assert main(["audit", *head, "--audit-dir", str(tmp_path / "audit"), "--audit-top", "0", "--folds", "2"]) == 0
    tune = ["--fine-tune-epochs", "1", "--fine-tune-at", "blocks:1", "--fine-tune-batch-size", "4"]
    assert main(["finetune", *head, *tune]) == 0
    assert "finetune, validation accuracy" in capsys.readouterr().out
    assert main(["export", *head, "--no-saved-model"]) == 0
    csv = tmp_path / "predictions.csv"
    assert main(["predict", *head, "--csv", str(csv), str(folder / "cat")]) == 0
    assert len(csv.read_text().splitlines()) == 9  # a header and the 8 cats
    if family == "dinov2":  # a fresh process: keras-hub's classes must be registered before the model loads
        fresh = subprocess.run([sys.executable, "-m", "pipeline", "predict", *head, str(folder / "dog")], cwd=ROOT)
        assert fresh.returncode == 0


def test_commands_without_a_hub_backbone_import_no_keras_hub(tmp_path):
    code = (
        "import sys, json\n"
        "from pipeline.cli import main\n"
        "from pipeline.features.extractor import build_extractor\n"
        "import pipeline.finetune.model, pipeline.export, pipeline.choose\n"
        "build_extractor('tiny', image_size=32, weights=None)\n"
        "main(['backbones'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('keras_hub', 'kagglehub')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_make_backbones_reads_a_cached_preset_and_lists_the_rest(presets, tmp_path, monkeypatch, capsys):
    cached = tmp_path / "kagglehub" / "models" / "keras" / "dinov2" / "keras" / "dinov2_small" / "1"
    save_tiny_preset("dinov2", cached)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    assert main(["backbones"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("hub:")}
    assert " 32    32 cls_mean" in lines["hub:dinov2_small"] and lines["hub:dinov2_small"].endswith("cache")
    assert " 224  1536 cls_mean" in lines["hub:dinov2_base"] and lines["hub:dinov2_base"].endswith("list")
