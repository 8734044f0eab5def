"""Import hygiene: Keras is kept from importing the optional libraries this tool never needs from it."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import MappingProxyType


class KerasWithoutOptionalImports:
    """An import finder that keeps Keras from importing the optional libraries it never needs here.

    `import tensorflow` imports Keras, and with it two modules this tool never uses that
    import a library whenever it is installed, as both are here: the scikit-learn wrappers
    (`keras.wrappers`; scikit-learn is the logistic head's) and the plotting helpers
    (`keras.visualization`, which imports `matplotlib.pyplot`; matplotlib draws the runs'
    figures). For those importers only, the library reads as absent, which both handle as
    Keras intends (`try: import ... except ImportError`); every other importer gets it as
    usual. Together they are over a second of every TensorFlow command's start.
    """

    #: importing module (prefix) -> the top-level packages it is refused.
    refused: Mapping[str, tuple[str, ...]] = MappingProxyType(
        {
            "keras.src.wrappers": ("sklearn",),
            "keras.src.visualization": ("matplotlib",),
        }
    )

    def find_spec(self, name, path=None, target=None):
        package = name.partition(".")[0]
        for prefix, packages in self.refused.items():
            if package in packages and self._importer().startswith(prefix):
                raise ModuleNotFoundError(
                    f"No module named {name!r} for {prefix} (pipeline.imports.KerasWithoutOptionalImports)"
                )
        return None

    @staticmethod
    def _importer() -> str:
        """The module whose code runs the import, past importlib's own frames."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
            frame = frame.f_back
        return frame.f_globals.get("__name__", "") if frame is not None else ""
