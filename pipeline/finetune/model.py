"""The fine-tuning model: the backbone, the augmentation and the head, and which layers train.

The backbone is called with `training=False`, so BatchNormalization normalizes with
its ImageNet statistics and never updates them; its layers also stay frozen
(`trainable=False`) everywhere. Layers from `fine_tune_at` up are unfrozen, and the
model is recompiled after every change of `trainable`, as Keras requires.

The head is warm-started from the stage-2 head (`Head.finetune_model`), so at step 0
the model predicts what the stage-2 head predicts; without one it is a fresh
Dropout + Dense head.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.augment import augmentation_layers
from pipeline.config import FeaturesConfig, FinetuneConfig
from pipeline.errors import ConfigError
from pipeline.export import image_classifier
from pipeline.features.backbones import get_backbone
from pipeline.features.extractor import build_extractor
from pipeline.heads.base import Head
from pipeline.heads.dense import logits_loss_and_accuracy
from pipeline.images import Resize

_BLOCK = re.compile(r"^(.*?(?:block_?\d+[a-z]?|layers_\d+))(?:_|$)")


def backbone_layers(backbone) -> list:
    """The layers that FINE_TUNE_AT counts and unfreezes, in order.

    A keras.applications model's own layers. A keras-hub backbone is nested (a model
    inside the base model, DINOv2's transformer blocks inside one encoder layer), so
    nested models and stacks of like blocks are opened up: its transformer blocks
    become units that `blocks:N` can count, as convolutional blocks are.
    """
    units = []
    for layer in backbone.layers:
        inner = getattr(layer, "layers", None) if not isinstance(layer, _keras_layers().BatchNormalization) else None
        stack = list(inner or [])
        if stack and (hasattr(layer, "inputs") or len({type(unit) for unit in stack}) == 1 and len(stack) > 1):
            units.extend(backbone_layers(layer))
        else:
            units.append(layer)
    return units


def _keras_layers():
    import keras

    return keras.layers


def block_starts(backbone) -> list[int]:
    """Indices of the layers where each block of `backbone` begins, in order.

    keras.applications name block layers `block_16_expand` (MobileNetV2), `block14_...`
    (Xception), `block7a_...` (EfficientNet) or `conv5_block3_...` (ResNet); keras-hub
    transformer blocks `encoder_block_3` (CLIP, SigLIP) or `layers_3` (DINOv2). A block is
    the run of layers sharing that prefix. Layers after the last block (the final
    1x1 convolution of MobileNetV2 or EfficientNet, a transformer's final LayerNorm) belong to it.
    """
    starts, current = [], None
    for index, layer in enumerate(backbone_layers(backbone)):
        match = _BLOCK.match(layer.name)
        if match and match.group(1) != current:
            current = match.group(1)
            starts.append(index)
    return starts


def resolve_fine_tune_at(backbone, fine_tune_at: str) -> int:
    """`fine_tune_at` -> the index of the first trainable layer of `backbone`.

    Accepts a layer index, `all` (0), `blocks:N` (the top N blocks) or a layer name
    (exact, else the first layer whose name starts with it).
    """
    layers = backbone_layers(backbone)
    text = str(fine_tune_at).strip()
    where = f"{backbone.name} has {len(layers)} layers (0-{len(layers) - 1})"
    if text == "all":
        return 0
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if not 0 <= index < len(layers):
            raise ConfigError(f"FINE_TUNE_AT={text} is out of range: {where}.")
        return index
    if text.startswith("blocks:"):
        count = text.partition(":")[2]
        starts = block_starts(backbone)
        if not count.isdigit() or not 1 <= int(count) <= len(starts):
            raise ConfigError(
                f"FINE_TUNE_AT={text}: expected blocks:N with 1 <= N <= {len(starts)}, the number of "
                f"blocks of {backbone.name}."
            )
        return starts[-int(count)]
    names = [layer.name for layer in layers]
    if text in names:
        return names.index(text)
    prefixed = [i for i, name in enumerate(names) if name.startswith(text)]
    if prefixed:
        return prefixed[0]
    close = difflib.get_close_matches(text, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Its layers run from {names[0]!r} to {names[-1]!r}."
    raise ConfigError(
        f"FINE_TUNE_AT={text!r} is neither a layer index, `all`, `blocks:N` nor a layer name of {backbone.name}.{hint}"
    )


def unfreeze(backbone, at: int, *, batch_norm: bool = False) -> None:
    """Makes layers `at`.. of `backbone` trainable and the ones below frozen.

    BatchNormalization layers stay frozen unless `batch_norm` (training from scratch):
    the guide's rule, which keeps their scale and offset matched to the statistics
    that `training=False` freezes.
    """
    import keras

    backbone.trainable = True
    for index, layer in enumerate(backbone_layers(backbone)):
        layer.trainable = index >= at
        if isinstance(layer, keras.layers.BatchNormalization) and not batch_norm:
            layer.trainable = False


def parameter_counts(model) -> dict[str, int]:
    """Trainable and non-trainable parameters, the figures of `model.summary()`."""

    def count(variables) -> int:
        return int(sum(math.prod(v.shape) for v in variables))

    return {"trainable": count(model.trainable_weights), "non_trainable": count(model.non_trainable_weights)}


@dataclass
class FinetuneModel:
    """The training model (images -> logits) and its parts, shared by reference."""

    model: Any
    extractor: Any
    head: Any
    fine_tune_at: int | None  # None: no fine-tuning phase (the seed workflow), nothing to unfreeze

    @property
    def backbone(self):
        return self.extractor.get_layer("backbone")

    def freeze_backbone(self) -> None:
        self.backbone.trainable = False

    def unfreeze(self, *, batch_norm: bool = False) -> None:
        unfreeze(self.backbone, self.fine_tune_at, batch_norm=batch_norm)

    def classifier(self, resize: Resize):
        """Raw uint8 images of any size -> probabilities, sharing the trained layers."""
        return image_classifier(
            self.extractor,
            self.head,
            resize=resize,
            name=f"{self.extractor.name.removesuffix('_extractor')}_finetuned",
        )


def build_model(features: FeaturesConfig, config: FinetuneConfig, head: Head | None, n_classes: int) -> FinetuneModel:
    """The fine-tuning model, its head copied from `head` (a fresh one when None)."""
    import keras

    keras.utils.set_random_seed(config.seed)
    spec = get_backbone(features.backbone, features.weights_arg)
    extractor = build_extractor(
        spec,
        image_size=features.image_size,
        weights=features.weights_arg,
        pooling=features.pooling,
        mixed_precision=config.mixed_precision,
    )
    # Without a fine-tuning phase FINE_TUNE_AT is unused, so it is not held against small backbones.
    at = resolve_fine_tune_at(extractor.get_layer("backbone"), config.fine_tune_at) if config.epochs else None
    units = 1 if n_classes == 2 else n_classes
    if head is None:
        head_model = _fresh_head(spec.pooled_dim(features.pooling), units, config)
    else:
        head_model = head.finetune_model(dropout=config.dropout, seed=config.seed)
    images = keras.Input((features.image_size, features.image_size, 3), name="images")
    x = augmentation_layers(config.augment, seed=config.seed)(images)
    logits = head_model(extractor(x))
    model = keras.Model(images, logits, name=f"{spec.model_name}_finetune")
    return FinetuneModel(model=model, extractor=extractor, head=head_model, fine_tune_at=at)


def _fresh_head(n_features: int, units: int, config: FinetuneConfig):
    import keras

    inputs = keras.Input((n_features,), name="features")
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(inputs)
    outputs = keras.layers.Dense(
        units, kernel_initializer=keras.initializers.GlorotUniform(seed=config.seed), name="logits"
    )(x)
    return keras.Model(inputs, outputs, name="head")


def compile_model(model, config: FinetuneConfig, learning_rate: float, binary: bool) -> None:
    import keras

    optimizers = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop, "sgd": keras.optimizers.SGD}
    optimizer = optimizers[config.optimizer](learning_rate)
    if config.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    loss, accuracy = logits_loss_and_accuracy(binary)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])
