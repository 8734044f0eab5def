"""Backbone registry: named keras.applications constructors and how to feed them.

Each `BackboneSpec` carries what a caller needs to use a backbone without knowing
its Keras module: the constructor, the preprocessing its ImageNet weights expect,
its native and minimal input sizes and the width of its pooled features.
`build_extractor` (in `pipeline.features.extractor`) turns a spec
into the one backbone contract of this project:

    images (N, S, S, 3) float32, raw 0-255  ->  features (N, feature_dim) float32

with the preprocessing inside the model, so a saved or exported model takes raw
images. The registry is the only module-level state; nothing is built at import,
and Keras is not imported here: a spec names its keras.applications constructor and
resolves it when a model is built.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.images import Resize

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

PREPROCESSING_MODES = ("tf", "caffe", "torch", "none")
HUB_PREFIX = "hub:"
#: Name prefix -> "module:function" building the spec of a name that is not registered, given the weights.
#: Named, not imported: the resolver's module imports this one, and keras-hub only where it is used.
_RESOLVERS = {HUB_PREFIX: "pipeline.features.hub:preset_spec"}

_HASH_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone.

    `preprocessing` is the `Preprocess` mode its ImageNet weights were trained
    with ("none" when the model rescales raw pixels itself); `feature_dim` is the
    channel count of its last feature map, hence the width of pooled features;
    `min_size` is the smallest square input the architecture accepts. `builder` is a
    constructor called like keras.applications', the name of one in
    `keras.applications`, or `module:function` (resolved by `resolve_builder`, so the registry needs no Keras).
    `runtimes` are the inference runtimes (`pipeline.features.runtimes`) it converts to and
    verifies on; a backbone left off one says why in `runtime_note`, which `make backbones`
    and RUNTIME=auto show.
    """

    name: str
    family: str
    builder: Callable[..., keras.Model] | str
    preprocessing: str
    default_size: int
    feature_dim: int
    min_size: int = 32
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    # Token models (keras-hub presets, `pipeline.features.hub`) pool tokens, not feature maps.
    poolings: tuple[str, ...] = ("avg", "max")
    default_pooling: str = "avg"
    prefix_tokens: int = 0  # tokens before the patch tokens (CLS, registers), left out of "mean"
    fixed_size: bool = False  # True: only `default_size` works (learned position embeddings)
    # How images are resized to the input (`pipeline.images.Resize`); keras-hub presets bring their own.
    resize_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def resize(self, image_size: int) -> Resize:
        """The resize of every image on its way into this backbone at `image_size` px."""
        return Resize(image_size, **self.resize_kwargs)

    @property
    def model_name(self) -> str:
        """The name as Keras accepts it for models and scopes: 'hub:dinov2_small' -> 'hub_dinov2_small'."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)

    def pooled_dim(self, pooling: str | None) -> int:
        """The width of the features after `pooling` (None: the default): "cls_mean" doubles it."""
        return self.feature_dim * (2 if (pooling or self.default_pooling) == "cls_mean" else 1)

    def check_pooling(self, pooling: str | None) -> str:
        """`pooling`, or the spec's default for None; one this backbone's output cannot take is an error."""
        pooling = pooling or self.default_pooling
        if pooling not in self.poolings:
            raise ConfigError(
                f"Backbone {self.name!r} supports pooling {', '.join(self.poolings)} "
                f"(default {self.default_pooling}). Received: pooling={pooling!r}; set POOLING to one of those."
            )
        return pooling

    runtimes: tuple[str, ...] = ("tensorflow", "openvino")
    runtime_note: str = ""

    def runtimes_text(self) -> str:
        """'tensorflow, openvino', or 'tensorflow (why not openvino)': what `make backbones` shows."""
        return ", ".join(self.runtimes) + (f" ({self.runtime_note})" if self.runtime_note else "")

    def resolve_builder(self) -> Callable[..., keras.Model]:
        """The constructor itself; importing Keras if the spec names one of keras.applications."""
        if callable(self.builder):
            return self.builder
        if ":" in self.builder:  # "package.module:function", imported when first built
            module, _, function = self.builder.partition(":")
            return getattr(importlib.import_module(module), function)
        import keras

        return getattr(keras.applications, self.builder)


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds `spec` to the registry; a name can be registered once only."""
    if not isinstance(spec, BackboneSpec):
        raise ConfigError(f"Expected a BackboneSpec. Received: spec of type {type(spec).__name__}.")
    if spec.preprocessing not in PREPROCESSING_MODES:
        raise ConfigError(
            f"Expected preprocessing to be one of {', '.join(PREPROCESSING_MODES)}. "
            f"Received: preprocessing={spec.preprocessing!r} for backbone "
            f"{spec.name!r}."
        )
    if spec.name in _REGISTRY:
        raise ConfigError(
            f"Backbone {spec.name!r} is already registered; choose another name. Received: backbone={spec.name!r}."
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_backbone(name: str, weights: str | os.PathLike | None = "imagenet") -> BackboneSpec:
    """The spec registered under `name`; an unknown name lists the valid ones.

    A `hub:<preset>` name is a keras-hub preset (`pipeline.features.hub`): its spec is
    read from the preset's own config, found through `weights` (a preset folder, or
    the preset's published weights for "imagenet" and None), so it is not registered.
    """
    for prefix, resolver in _RESOLVERS.items():
        if isinstance(name, str) and name.startswith(prefix):
            module, _, function = resolver.partition(":")
            return getattr(importlib.import_module(module), function)(name, weights)
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown backbone {name!r}. Expected one of: {', '.join(list_backbones())}, "
            f"or {HUB_PREFIX}<keras-hub preset>. Received: backbone={name!r}."
        ) from None


def input_resize(config) -> Resize:
    """The resize of a resolved `FeaturesConfig`'s backbone: what every stage applies to its images."""
    return get_backbone(config.backbone, config.weights_arg).resize(config.image_size)


def weights_identity(weights: str | os.PathLike | None) -> str:
    """A string that changes whenever the weights do, for cache keys and metadata.

    "none" and "imagenet" stand for themselves; a file is identified by the
    sha256 of its content, so renaming it keeps cached features valid and
    replacing it invalidates them. A folder (a keras-hub preset) by the sha256 of
    its files' names and contents.
    """
    if weights is None:
        return "none"
    if weights == "imagenet":
        return "imagenet"
    path = check_weights(weights)
    digest = hashlib.sha256()
    files = sorted(p for p in _walk(path)) if os.path.isdir(path) else [path]
    for file in files:
        if file != path:
            digest.update(os.path.relpath(file, path).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK_BYTES), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _walk(folder: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def check_weights(weights: str | os.PathLike) -> str:
    """The path of an existing weights file or preset folder, or a ConfigError saying what to pass."""
    try:
        path = os.fspath(weights)
    except TypeError:
        path = None
    if not isinstance(path, str) or not os.path.exists(path):
        raise ConfigError(
            "weights must be None, 'imagenet' or the path to an existing weights "
            f"file (keras-hub: preset folder). Received: weights={weights!r} (no such file)."
        )
    return path


#: The built-in backbones: name, family, keras.applications constructor, preprocessing mode, native
#: size, feature width, smallest size, constructor arguments (dims and modes as in keras.applications' own tests). With
#: include_top=False MobileNetV3 ends at its last conv (576 / 960), and EfficientNet, its V2 and
#: ConvNeXt rescale and normalize inside the model.
_RESCALES = types.MappingProxyType({"include_preprocessing": True})
BUILTIN_BACKBONES: tuple[BackboneSpec, ...] = (
    BackboneSpec("mobilenet", "MobileNet", "MobileNet", "tf", 224, 1024, 32, {"alpha": 1.0}),
    BackboneSpec("mobilenet_075", "MobileNet", "MobileNet", "tf", 224, 768, 32, {"alpha": 0.75}),
    BackboneSpec("mobilenet_v2", "MobileNetV2", "MobileNetV2", "tf", 224, 1280),
    BackboneSpec("mobilenet_v3_small", "MobileNetV3", "MobileNetV3Small", "none", 224, 576, 32, _RESCALES),
    BackboneSpec("mobilenet_v3_large", "MobileNetV3", "MobileNetV3Large", "none", 224, 960, 32, _RESCALES),
    BackboneSpec("xception", "Xception", "Xception", "tf", 299, 2048, min_size=71),
    BackboneSpec("inception_v3", "InceptionV3", "InceptionV3", "tf", 299, 2048, min_size=75),
    BackboneSpec("inception_resnet_v2", "InceptionResNetV2", "InceptionResNetV2", "tf", 299, 1536, min_size=75),
    BackboneSpec("resnet50", "ResNet", "ResNet50", "caffe", 224, 2048),
    BackboneSpec("resnet101", "ResNet", "ResNet101", "caffe", 224, 2048),
    BackboneSpec("resnet152", "ResNet", "ResNet152", "caffe", 224, 2048),
    BackboneSpec("resnet50_v2", "ResNetV2", "ResNet50V2", "tf", 224, 2048),
    BackboneSpec("resnet101_v2", "ResNetV2", "ResNet101V2", "tf", 224, 2048),
    BackboneSpec("resnet152_v2", "ResNetV2", "ResNet152V2", "tf", 224, 2048),
    BackboneSpec("densenet121", "DenseNet", "DenseNet121", "torch", 224, 1024),
    BackboneSpec("densenet169", "DenseNet", "DenseNet169", "torch", 224, 1664),
    BackboneSpec("densenet201", "DenseNet", "DenseNet201", "torch", 224, 1920),
    BackboneSpec("vgg16", "VGG", "VGG16", "caffe", 224, 512),
    BackboneSpec("vgg19", "VGG", "VGG19", "caffe", 224, 512),
    BackboneSpec("nasnet_mobile", "NASNet", "NASNetMobile", "tf", 224, 1056),
    BackboneSpec("efficientnet_b0", "EfficientNet", "EfficientNetB0", "none", 224, 1280),
    BackboneSpec("efficientnet_b1", "EfficientNet", "EfficientNetB1", "none", 240, 1280),
    BackboneSpec("efficientnet_b2", "EfficientNet", "EfficientNetB2", "none", 260, 1408),
    BackboneSpec("efficientnet_b3", "EfficientNet", "EfficientNetB3", "none", 300, 1536),
    BackboneSpec("efficientnet_b4", "EfficientNet", "EfficientNetB4", "none", 380, 1792),
    BackboneSpec("efficientnet_b5", "EfficientNet", "EfficientNetB5", "none", 456, 2048),
    BackboneSpec("efficientnet_b6", "EfficientNet", "EfficientNetB6", "none", 528, 2304),
    BackboneSpec("efficientnet_b7", "EfficientNet", "EfficientNetB7", "none", 600, 2560),
    BackboneSpec("efficientnet_v2_b0", "EfficientNetV2", "EfficientNetV2B0", "none", 224, 1280, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_b1", "EfficientNetV2", "EfficientNetV2B1", "none", 240, 1280, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_b2", "EfficientNetV2", "EfficientNetV2B2", "none", 260, 1408, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_b3", "EfficientNetV2", "EfficientNetV2B3", "none", 300, 1536, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_s", "EfficientNetV2", "EfficientNetV2S", "none", 384, 1280, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_m", "EfficientNetV2", "EfficientNetV2M", "none", 480, 1280, 32, _RESCALES),
    BackboneSpec("efficientnet_v2_l", "EfficientNetV2", "EfficientNetV2L", "none", 480, 1280, 32, _RESCALES),
    BackboneSpec("convnext_tiny", "ConvNeXt", "ConvNeXtTiny", "none", 224, 768, 32, _RESCALES),
    BackboneSpec("convnext_small", "ConvNeXt", "ConvNeXtSmall", "none", 224, 768, 32, _RESCALES),
    BackboneSpec("convnext_base", "ConvNeXt", "ConvNeXtBase", "none", 224, 1024, 32, _RESCALES),
    BackboneSpec("convnext_large", "ConvNeXt", "ConvNeXtLarge", "none", 224, 1536, 32, _RESCALES),
    BackboneSpec("convnext_xlarge", "ConvNeXt", "ConvNeXtXLarge", "none", 224, 2048, 32, _RESCALES),
    # No ImageNet weights; a file saved from it loads.
    BackboneSpec("tiny", "Tiny", "pipeline.features.tiny:tiny_convnet", "tf", 32, 32, min_size=16, pretrained=False),
)

_REGISTRY: dict[str, BackboneSpec] = {}
for _spec in BUILTIN_BACKBONES:
    register_backbone(_spec)
