"""The backbone as a Keras model: raw 0-255 images in, pooled features out.

Kept apart from the registry (`pipeline.features.backbones`), which is plain data: listing
backbones, resolving a cache key or finding an up-to-date feature file needs no
Keras, and importing Keras costs seconds. Everything here builds models.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Any

import keras
import numpy as np

from pipeline.errors import ConfigError, WeightsUnavailableError
from pipeline.features.backbones import (
    HUB_PREFIX,
    PREPROCESSING_MODES,
    BackboneSpec,
    check_weights,
    get_backbone,
)
from pipeline.features.pooling import pooling_layer

logger = logging.getLogger(__name__)

# Constants of keras.applications.imagenet_utils.preprocess_input.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_URL_FETCH_FAILURE = re.compile(r"URL fetch failure on (\S+?): ")


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """Maps raw 0-255 RGB pixels to what a backbone's weights expect.

    Modes follow `keras.applications.imagenet_utils.preprocess_input` for
    channels-last input: "tf" scales to [-1, 1]; "caffe" flips RGB to BGR and
    subtracts the ImageNet BGR means; "torch" scales to [0, 1] and standardizes
    with the ImageNet mean and std; "none" passes pixels through for models that
    rescale themselves. Living inside the model, it travels with saved models.
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"Expected mode to be one of {', '.join(PREPROCESSING_MODES)}. Received: mode={mode!r}.")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "none":
            return x
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            x = x / 255.0
            mean, std = _TORCH_MEAN, _TORCH_STD
        else:
            x = keras.ops.flip(x, axis=-1)
            mean, std = _CAFFE_BGR_MEAN, None
        x = x + keras.ops.convert_to_tensor(-np.array(mean), dtype=x.dtype)
        if std is not None:
            x = x / keras.ops.convert_to_tensor(np.array(std), dtype=x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def build_extractor(
    spec: BackboneSpec | str,
    *,
    image_size: int,
    weights: str | os.PathLike | None,
    pooling: str | None = None,
    mixed_precision: bool = False,
) -> keras.Model:
    """Builds a frozen feature extractor: raw images in, pooled features out.

    Args:
        spec: a `BackboneSpec` or a registered name.
        image_size: side S of the square (N, S, S, 3) float32 input, 0-255 pixels.
        weights: None (random), "imagenet" (Keras's cache or download) or the path
            of a Keras .h5 weights file for this architecture without its top.
        pooling: one of `spec.poolings` (`pipeline.features.pooling`); None: the spec's default.
        mixed_precision: builds under "mixed_float16"; the global dtype policy is
            restored afterwards and the output stays float32.

    Returns:
        A functional model named "<name>_extractor" with input layer "images",
        the non-trainable base model as layer "backbone" (called with
        training=False so BatchNormalization stays in inference mode even when
        fine-tuning) and output layer "pooling" of shape (N, feature_dim) float32.

    Raises:
        ConfigError: an invalid option, or one Keras rejects for this backbone.
        WeightsUnavailableError: ImageNet weights are neither cached nor
            downloadable; the message names the file and where to put it.
    """
    if not isinstance(spec, BackboneSpec):
        spec = get_backbone(spec, weights)
    weights = _checked_options(spec, image_size, weights, pooling)
    pooling = spec.check_pooling(pooling)
    previous_policy = keras.config.dtype_policy()
    try:
        if mixed_precision:
            keras.config.set_dtype_policy("mixed_float16")
        inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
        # float32 keeps the mean subtraction precise; the backbone casts afterwards.
        x = Preprocess(spec.preprocessing, name="preprocess", dtype="float32")(inputs)
        base = _build_base(spec, image_size=image_size, weights=weights)
        base.name = "backbone"
        base.trainable = False
        x = base(x, training=False)
        # A float32 layer casts its input, so features are float32 in any policy.
        outputs = pooling_layer(pooling, prefix_tokens=spec.prefix_tokens, name="pooling", dtype="float32")(x)
        model = keras.Model(inputs, outputs, name=f"{spec.model_name}_extractor")
    finally:
        keras.config.set_dtype_policy(previous_policy)
    logger.info(
        "Built %s: %dx%d px, weights=%s, pooling=%s, mixed_precision=%s, %d features",
        model.name,
        image_size,
        image_size,
        weights,
        pooling,
        mixed_precision,
        spec.pooled_dim(pooling),
    )
    return model


def _checked_options(spec: BackboneSpec, image_size: int, weights, pooling: str):
    """Validates the options before any Keras work; returns the weights argument to build with."""
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size must be an integer. Received: image_size={image_size!r}.")
    if image_size < spec.min_size:
        raise ConfigError(
            f"Backbone {spec.name!r} needs images of at least {spec.min_size}x"
            f"{spec.min_size} pixels (native size {spec.default_size}). Received: "
            f"image_size={image_size}."
        )
    if spec.fixed_size and image_size != spec.default_size:
        raise ConfigError(
            f"Backbone {spec.name!r} learned position embeddings for {spec.default_size} px only. "
            f"Received: image_size={image_size}; leave IMAGE_SIZE unset or set it to {spec.default_size}."
        )
    spec.check_pooling(pooling)
    if weights is not None and weights != "imagenet":
        weights = check_weights(weights)
        if os.path.isdir(weights) and not spec.name.startswith(HUB_PREFIX):
            raise ConfigError(
                f"A weights folder is a keras-hub preset, for {HUB_PREFIX}<preset> backbones; {spec.name!r} "
                f"takes an .h5 weights file. Received: weights={weights!r}."
            )
    if weights == "imagenet" and not spec.pretrained:
        raise ConfigError(
            f"Backbone {spec.name!r} has no ImageNet weights; use weights=None (random "
            f"initialization) or a weights file saved from it. Received: weights={weights!r}."
        )
    return weights


def _build_base(spec: BackboneSpec, *, image_size: int, weights: str | None):
    """Calls the spec's builder, turning Keras's failures into pipeline errors."""
    models_dir = _keras_models_dir()
    cached_before = _listdir(models_dir) if weights == "imagenet" else set()
    broken_links = {f for f in cached_before if not os.path.exists(os.path.join(models_dir, f))}
    try:
        return spec.resolve_builder()(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            pooling=None,
            **spec.builder_kwargs,
        )
    except ConfigError:
        raise
    except ValueError as err:
        # e.g. NASNet or MobileNet ImageNet weights that exist for one size only.
        raise ConfigError(
            f"Keras cannot build backbone {spec.name!r} with image_size={image_size}, weights={weights!r}: {err}"
        ) from err
    except Exception as err:
        file_name = _failed_download(err)
        if weights != "imagenet" or file_name is None:
            raise
        if file_name in broken_links:
            raise WeightsUnavailableError(
                f"Cannot use ImageNet weights for {spec.name}: "
                f"{os.path.join(models_dir, file_name)} is a broken "
                "symbolic link. Point it at the weights file, or pass WEIGHTS=/path/to/that.h5."
            ) from err
        if file_name in cached_before:
            # get_file re-downloads a cached file whose hash differs from the
            # official one, and deletes it when that download fails.
            raise WeightsUnavailableError(
                f"Cannot use ImageNet weights for {spec.name}: Keras found "
                f"{file_name!r} in {models_dir}{os.sep} but its hash differs from the "
                "official file, so it deleted it and tried to download it again (no "
                "network?). Pass WEIGHTS=/path/to/that.h5 instead: a path is loaded "
                "without a hash check."
            ) from err
        raise WeightsUnavailableError(
            f"Cannot download ImageNet weights for {spec.name} (no network?). Put "
            f"{file_name!r} in {models_dir}{os.sep} or pass "
            "WEIGHTS=/path/to/that.h5."
        ) from err


def _listdir(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _failed_download(err: Exception) -> str | None:
    """The file name in keras.utils.get_file's "URL fetch failure on <url>: ..."."""
    match = _URL_FETCH_FAILURE.match(str(err))
    if match is None:
        return None
    return os.path.basename(urllib.parse.urlsplit(match.group(1)).path) or None


def _keras_models_dir() -> str:
    """The folder keras.utils.get_file caches weights in.

    Keras reads KERAS_HOME once, when it is imported, and falls back to
    /tmp/.keras when that folder is not writable; asking Keras (and mirroring
    the fallback) names the folder it really looked in.
    """
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:  # Keras moved its private accessor: use its documented rule.
        home = os.environ.get("KERAS_HOME", os.path.join("~", ".keras"))
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")
