"""keras-hub image presets as backbones: `BACKBONE=hub:<preset>`.

A preset is a folder (or a Kaggle/Hugging Face handle keras-hub downloads into one)
holding `config.json` (the backbone's class and architecture) and the image
converter's config (`image_converter.json`, or inside `preprocessor.json`) with the
preset's own image size, resize mode and pixel scale and offset (mean and std).
`preset_spec` reads both and returns a `BackboneSpec`, so nothing about a preset is
copied by hand. Reading a folder needs no keras-hub and no Keras: resolving a
cache key stays cheap, and commands that do not build a hub backbone never import
keras-hub (about 1 s on top of Keras, docs/backbones.md).

`WEIGHTS` says where the preset comes from: a folder written by `save_to_preset`
(the offline route), `imagenet` for the preset's published weights (keras-hub's
cache or a download), `none` for its architecture with random weights.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, WeightsUnavailableError
from pipeline.features.backbones import HUB_PREFIX, BackboneSpec, check_weights
from pipeline.images import INTERPOLATIONS
from pipeline.network import NETWORK_TIMEOUT_S, unreachable

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[hub]' (or pip install keras-hub)"


@dataclass(frozen=True)
class HubFamily:
    """How the pipeline pools one keras-hub class's output, and the paper's linear-probe choice.

    `prefix_tokens` counts the tokens before the patch tokens given the backbone's config
    (CLS plus DINOv2's registers); `fixed_size` marks learned position embeddings that
    keras-hub does not interpolate, so the preset's image size is the only one.
    """

    name: str
    poolings: tuple[str, ...]
    default_pooling: str
    prefix_tokens: Callable[[Mapping[str, Any]], int] = lambda config: 1
    fixed_size: bool = False


_TOKENS = ("cls", "mean", "cls_mean")
_DINO = HubFamily("DINOv2", _TOKENS, "cls_mean", lambda config: 1 + int(config.get("num_register_tokens", 0)))
_DINO3 = HubFamily("DINOv3", _TOKENS, "cls_mean", lambda config: 1 + int(config.get("num_register_tokens", 0)))
# CLIP's linear probes use the image embedding of the CLS token; SigLIP pools with its own attention head (MAP).
_CLIP = HubFamily("CLIP", _TOKENS, "cls", fixed_size=True)
_SIGLIP = HubFamily("SigLIP", ("pooled",), "pooled", fixed_size=True)

#: keras-hub class name -> family. Dual-tower classes (CLIP, SigLIP) are used through their vision tower.
FAMILIES: dict[str, HubFamily] = {
    "DINOV2Backbone": _DINO,
    "DINOV3Backbone": _DINO3,
    "CLIPBackbone": _CLIP,
    "CLIPVisionEncoder": _CLIP,
    "SigLIPBackbone": _SIGLIP,
    "SigLIPVisionEncoder": _SIGLIP,
}
#: Output rank -> family of a class not in FAMILIES, whose output shape is read off a random-init build.
_BY_RANK = {
    4: HubFamily("feature map", ("avg", "max"), "avg", lambda config: 0),
    3: HubFamily("tokens", _TOKENS, "cls"),
    2: HubFamily("pooled", ("pooled",), "pooled", lambda config: 0),
}


def preset_name(backbone: str) -> str:
    """'hub:dinov2_small' -> 'dinov2_small'; an empty preset is an error."""
    preset = backbone.removeprefix(HUB_PREFIX)
    if not preset:
        raise ConfigError(f"Expected {HUB_PREFIX}<keras-hub preset>, e.g. hub:dinov2_small. Received: {backbone!r}.")
    return preset


def preset_spec(backbone: str, weights: str | os.PathLike | None) -> BackboneSpec:
    """The spec of `hub:<preset>`, read from the preset's config (see the module docstring)."""
    preset = preset_name(backbone)
    folder = preset_folder(preset, weights)
    config = _read_json(folder, "config.json")
    converter = image_converter_config(folder)
    class_name = config.get("class_name", "?")
    vision = _vision_config(config)
    family = FAMILIES.get(class_name) or _family_by_output(folder, class_name)
    size = converter.get("image_size") or vision.get("image_shape", [None])[:2]
    if not size or size[0] is None:
        raise ConfigError(f"keras-hub preset {preset!r} ({folder}) names no image size in its image converter.")
    return BackboneSpec(
        name=backbone,
        family=f"{family.name} (keras-hub {class_name})",
        builder="pipeline.features.hub:build_preset_backbone",
        preprocessing="none",  # the preset's own scale and offset run inside the base model
        default_size=int(size[0]),
        feature_dim=_width(folder, class_name, vision),
        min_size=int(vision.get("patch_size", 32)),
        builder_kwargs={
            "preset": folder,
            "scale": converter.get("scale", 1.0 / 255),
            "offset": converter.get("offset", 0.0),
            "resizable": not family.fixed_size,
        },
        poolings=family.poolings,
        default_pooling=family.default_pooling,
        prefix_tokens=family.prefix_tokens(vision),
        fixed_size=family.fixed_size,
        resize_kwargs=_resize_kwargs(folder, converter),
    )


def _resize_kwargs(folder: str, converter: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's resize, with keras-hub's ImageConverter defaults for what its config leaves out."""
    if converter.get("pad_to_aspect_ratio"):
        raise ConfigError(
            f"keras-hub preset {folder} pads images to a square (pad_to_aspect_ratio), which this pipeline does "
            "not do yet. Use a preset that crops or resizes."
        )
    interpolation = converter.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"keras-hub preset {folder} resizes with {interpolation!r}; "
            f"this pipeline offers {', '.join(INTERPOLATIONS)}."
        )
    return {
        "interpolation": interpolation,
        "crop_to_aspect_ratio": bool(converter.get("crop_to_aspect_ratio", True)),
        "antialias": bool(converter.get("antialias", False)),
    }


def preset_folder(preset: str, weights: str | os.PathLike | None) -> str:
    """The local folder of the preset: WEIGHTS when it is one, else keras-hub's cached download."""
    if weights is not None and weights != "imagenet":
        folder = check_weights(weights)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConfigError(
                f"WEIGHTS for {HUB_PREFIX}{preset} must be a keras-hub preset folder (with config.json, written "
                f"by save_to_preset). Received: weights={os.fspath(weights)!r}."
            )
        return folder
    cached = cached_folder(preset)
    if cached is not None:
        return cached
    _check_network(preset)
    return os.path.dirname(_download(preset, "config.json"))


#: Where a preset handle downloads from; a plain name is one of keras-hub's Kaggle presets.
_HOSTS = {"hf": "huggingface.co", "kaggle": "api.kaggle.com"}


def _check_network(preset: str) -> None:
    """Fails in seconds, before keras-hub (and TensorFlow) is imported, when the preset's host is unreachable."""
    scheme = preset.partition("://")[0].lower() if "://" in preset else "kaggle"
    host = _HOSTS.get(scheme)
    if host is None:  # gs://, a local path keras-hub resolves itself
        return
    problem = unreachable(host)
    if problem:
        raise WeightsUnavailableError(_unavailable(preset, problem))


def cached_folder(preset: str) -> str | None:
    """The newest copy of `preset` in kagglehub's cache (KAGGLEHUB_CACHE, else ~/.cache/kagglehub), without keras-hub.

    Mirrors kagglehub's own rule for its cache folder, as `_keras_models_dir` mirrors Keras's.
    """
    cache = os.environ.get("KAGGLEHUB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kagglehub")
    found = glob.glob(os.path.join(cache, "models", "*", "*", "keras", preset, "*", "config.json"))
    if not found:
        return None
    newest = max(found, key=lambda path: int(os.path.basename(os.path.dirname(path)) or 0))
    return os.path.dirname(newest)


def _download(preset: str, file_name: str) -> str:
    """keras-hub's `get_file` with a short network timeout; a failure is one line naming both ways out."""
    try:
        from keras_hub.src.utils.preset_utils import get_file
    except ImportError:
        raise ConfigError(f"{HUB_PREFIX}{preset} needs keras-hub, which is not installed: {INSTALL_HINT}.") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
    try:
        return get_file(preset, file_name)
    except ValueError as err:  # an unknown preset name or handle
        raise ConfigError(f"keras-hub does not know preset {preset!r}: {_first_line(err)}") from None
    except Exception as err:  # requests, kagglehub and huggingface_hub each raise their own
        raise WeightsUnavailableError(_unavailable(preset, f"{type(err).__name__}: {_first_line(err)[:120]}")) from None
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable(preset: str, why: str) -> str:
    """The one-line error of a preset that is neither local nor downloadable, naming both ways out."""
    return (
        f"Cannot fetch keras-hub preset {preset!r} ({why}). Either run once with network access (keras-hub "
        f"caches it), or on a machine with one save it with keras_hub.models.Backbone.from_preset({preset!r})"
        f".save_to_preset(DIR) plus its ImageConverter's save_to_preset(DIR), copy DIR here and pass WEIGHTS=DIR."
    )


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def image_converter_config(folder: str) -> dict[str, Any]:
    """The preset's image converter config: image size, scale, offset, interpolation."""
    for file_name, keys in (("image_converter.json", ()), ("preprocessor.json", ("image_converter",))):
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            config = _read_json(folder, file_name).get("config", {})
            for key in keys:
                config = (config.get(key) or {}).get("config", {})
            if config:
                return config
    raise ConfigError(
        f"keras-hub preset {folder} has no image converter (image_converter.json), so its image size and "
        "normalization are unknown. Save the preset's ImageConverter into it with save_to_preset(DIR)."
    )


def _read_json(folder: str, file_name: str) -> dict[str, Any]:
    path = os.path.join(folder, file_name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read keras-hub preset file {path}: {err}.") from None


def _vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture config of the image tower: the backbone's, or its `vision_encoder`'s."""
    inner = dict(config.get("config", {}))
    vision = inner.get("vision_encoder")
    if isinstance(vision, Mapping):
        return dict(vision.get("config", vision))
    return inner


def _width(folder: str, class_name: str, vision: Mapping[str, Any]) -> int:
    """The channel width of the output: `hidden_dim` for transformers, else read off a build."""
    if "hidden_dim" in vision and class_name in FAMILIES:
        return int(vision["hidden_dim"])
    return int(_output_shape(folder)[-1])


def _family_by_output(folder: str, class_name: str) -> HubFamily:
    """The family of a class this module does not list, from the rank of its output."""
    rank = len(_output_shape(folder))
    if rank not in _BY_RANK:
        raise ConfigError(
            f"keras-hub class {class_name} ({folder}) is not an image backbone: its output has rank {rank}."
        )
    return _BY_RANK[rank]


def _output_shape(folder: str) -> tuple:
    """The output shape of the preset's image tower, from a random-init build (no weights loaded)."""
    return _image_tower(folder, load_weights=False, image_shape=None).output_shape


def _image_tower(folder: str, *, load_weights: bool, image_shape):
    import keras_hub

    kwargs = {} if image_shape is None else {"image_shape": tuple(image_shape)}
    backbone = keras_hub.models.Backbone.from_preset(folder, load_weights=load_weights, **kwargs)
    return getattr(backbone, "vision_encoder", backbone)


def build_preset_backbone(
    *, include_top: bool, weights, input_shape, pooling, preset: str, scale, offset, resizable: bool
):
    """The base model of a hub spec, called like a keras.applications constructor.

    Raw 0-255 pixels (N, S, S, 3) -> the preset's scale and offset -> its image tower ->
    tokens (N, T, C), a feature map or pooled features. `weights=None` keeps the
    architecture with random weights; anything else loads the preset's weights.
    """
    import keras

    from pipeline.features.hub_layers import Rescale

    tower = _image_tower(preset, load_weights=weights is not None, image_shape=input_shape if resizable else None)
    inputs = keras.Input(input_shape, name="images")
    x = Rescale(scale, offset, name="preset_rescale", dtype="float32")(inputs)
    if isinstance(tower.input, dict):  # DINOv2 takes {"images": ...}
        x = {name: x for name in tower.input}
    return keras.Model(inputs, tower(x), name=tower.name)


def register_layers() -> None:
    """Imports keras-hub and this pipeline's hub layers, so a saved model that holds them loads."""
    import keras_hub  # noqa: F401  registers keras-hub's classes for deserialization

    import pipeline.features.hub_layers  # noqa: F401
