"""The Keras layer of keras-hub backbones: the preset's pixel scale and offset inside the model.

Apart from `pipeline.features.hub`, which reads preset configs without Keras.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="pipeline")
class Rescale(keras.layers.Layer):
    """x * scale + offset on raw 0-255 pixels, per channel or scalar: a preset's normalization.

    keras-hub image converters store mean and std this way (scale = 1 / (255 std),
    offset = -mean / std); living inside the model, it travels with exported models.
    """

    def __init__(self, scale, offset, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale
        self.offset = offset

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        scale = keras.ops.convert_to_tensor(np.asarray(self.scale, np.float32), dtype=x.dtype)
        offset = keras.ops.convert_to_tensor(np.asarray(self.offset, np.float32), dtype=x.dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}
