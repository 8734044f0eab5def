"""The head registry: every head by its name, built, looked up or loaded from a saved directory.

Two heads are registered in `HEADS` and built by name with `create_head`:

- `"logistic"`: `LogisticHead`, a standardized multinomial logistic regression whose
  `C` is picked on the validation split.
- `"dense"`: `DenseHead`, the Keras transfer-learning guide's head (dropout and one
  Dense layer on logits, optionally one hidden ReLU layer), trained with Adam and
  early stopping on the validation loss.

`load_head(head_dir)` reads `head.json` and dispatches on its `"head"` name. The
registry imports the heads; no head imports the registry.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, DataError
from pipeline.heads.base import JSON_NAME, Head, read_record
from pipeline.heads.dense import DenseHead
from pipeline.heads.logistic import LogisticHead

HEADS: dict[str, type[Head]] = {"logistic": LogisticHead, "dense": DenseHead}


def list_heads() -> list[str]:
    """Sorted names accepted by `create_head`."""
    return sorted(HEADS)


def create_head(name: str, **params: Any) -> Head:
    """Build an unfitted head by registry name with the given hyper-parameters."""
    cls = head_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"Unknown parameter(s) {', '.join(unknown)} for head '{name}'. Expected "
            f"some of: {', '.join(accepted)}. Received: {params!r}."
        )
    return cls(**params)


def head_class(name: str) -> type[Head]:
    """The registered head class called `name`; an unknown name lists the valid ones."""
    if name not in HEADS:
        raise ConfigError(
            f"Unknown head '{name}'. Expected one of: {', '.join(list_heads())}. Received: head={name!r}."
        )
    return HEADS[name]


def load_head(directory: str | os.PathLike) -> Head:
    """Load a saved head of any registered kind, dispatching on its `head.json`."""
    record = read_record(Path(directory))
    name = record["head"]
    if name not in HEADS:
        raise DataError(
            f"Unknown head '{name}' in {Path(directory) / JSON_NAME}. Expected one "
            f"of: {', '.join(list_heads())}. Fix: retrain the head."
        )
    return HEADS[name].load(directory)
