"""Pooling layers: a backbone's last output -> one feature vector per image, by name.

Convolutional backbones end in a feature map (N, H, W, C), pooled by "avg" or "max".
Vision transformers end in tokens (N, T, C): the CLS token first, then any register
tokens, then the patch tokens. "cls" keeps the CLS token, "mean" averages the patch
tokens, "cls_mean" concatenates both (DINOv2's linear-probe recipe, hence 2C wide).
"pooled" passes through a model that pools itself (SigLIP's attention-pooling head).
Which of them a backbone accepts, and its default, are on its `BackboneSpec`.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="pipeline")
class TokenPooling(keras.layers.Layer):
    """(N, T, C) tokens -> (N, C) or (N, 2C) features; (N, C) passes through as "pooled".

    `prefix_tokens` counts the tokens before the patches (CLS plus registers), which
    "mean" leaves out: averaging registers in would mix a different kind of token.
    """

    def __init__(self, mode: str, prefix_tokens: int = 1, **kwargs: Any) -> None:
        if mode not in TOKEN_POOLINGS:
            raise ValueError(f"Expected mode to be one of {', '.join(TOKEN_POOLINGS)}. Received: mode={mode!r}.")
        super().__init__(**kwargs)
        self.mode = mode
        self.prefix_tokens = int(prefix_tokens)

    def call(self, tokens):
        tokens = keras.ops.cast(tokens, self.compute_dtype)
        if self.mode == "pooled":
            return tokens
        cls = tokens[:, 0, :]
        if self.mode == "cls":
            return cls
        mean = keras.ops.mean(tokens[:, self.prefix_tokens :, :], axis=1)
        if self.mode == "mean":
            return mean
        return keras.ops.concatenate([cls, mean], axis=-1)

    def compute_output_shape(self, input_shape):
        width = input_shape[-1] * (2 if self.mode == "cls_mean" else 1)
        return (input_shape[0], width)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode, "prefix_tokens": self.prefix_tokens}


TOKEN_POOLINGS = ("cls", "mean", "cls_mean", "pooled")

#: name -> a factory of the pooling layer, given the spec's prefix token count.
_LAYERS = {
    "avg": lambda prefix, **kw: keras.layers.GlobalAveragePooling2D(**kw),
    "max": lambda prefix, **kw: keras.layers.GlobalMaxPooling2D(**kw),
    **{mode: (lambda prefix, mode=mode, **kw: TokenPooling(mode, prefix, **kw)) for mode in TOKEN_POOLINGS},
}


def pooling_layer(pooling: str, *, prefix_tokens: int = 0, **kwargs: Any) -> keras.layers.Layer:
    """The layer of `pooling` (validated against the spec by the caller); kwargs go to the layer."""
    return _LAYERS[pooling](prefix_tokens, **kwargs)
