"""Export and predict: one pure-Keras model from raw images to class probabilities.

The exported model is the frozen backbone (with its preprocessing inside) plus
pooling plus the stage-2 head as Keras layers: the logistic head becomes a Dense
layer carrying its (standardization-folded) coefficients. Input: uint8 RGB images
of any size, resized inside exactly as stage 1 resized them, so its probabilities
equal the head applied to the cached features.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import logging
import shlex
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import runs
from pipeline.config import FeaturesConfig
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.features.backbones import HUB_PREFIX, get_backbone, weights_identity
from pipeline.features.extractor import build_extractor
from pipeline.features.listing import image_files
from pipeline.heads.base import JSON_NAME, Head
from pipeline.heads.registry import load_head
from pipeline.images import Resize

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
KERAS_FILE = "model.keras"


def probabilities(logits):
    """Logits (N, U) -> K softmax probabilities as a layer output.

    A binary head's single logit z becomes a softmax over [0, z], which is exactly
    [1 - sigmoid(z), sigmoid(z)]: every exported model has K softmax outputs.
    """
    import keras

    if logits.shape[-1] == 1:
        pad = keras.layers.Dense(2, use_bias=False, trainable=False, name="binary_logits")
        logits = pad(logits)
        pad.set_weights([np.array([[0.0, 1.0]], np.float32)])
    return keras.layers.Softmax(name="probabilities", dtype="float32")(logits)


def probability_head(head: Head):
    """The fitted head as a Keras model: features (N, D) -> probabilities (N, K)."""
    import keras

    inputs = keras.Input((head.n_features_,), name="features")
    return keras.Model(inputs, probabilities(head.logits_model()(inputs)), name="head_probabilities")


def image_classifier(extractor, head_logits, *, resize: Resize, name: str):
    """Raw uint8 images (N, H, W, 3), any H and W -> probabilities (N, K).

    `extractor` maps (N, S, S, 3) float 0-255 images to features and `head_logits`
    features to logits; both are reused as they are, trained weights included.
    """
    import keras

    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    # Resizing keeps an integer input's dtype, rounding the interpolated pixels; stage 1
    # resized in float32, so cast first or the exported model sees other pixels.
    pixels = keras.ops.cast(images, "float32")
    resized = resize.keras_layer()(pixels)
    return keras.Model(images, probabilities(head_logits(extractor(resized))), name=name)


def build_classifier(features: FeaturesConfig, head: Head, *, weights_key: str | None = None):
    """The stage-2 classifier: raw uint8 images of any size -> probabilities (N, K).

    `weights_key` is the weights identity stored with the features; if the weights
    file changed since, the backbone would not match the head, so that is an error.
    """
    if weights_key is not None:
        check_same_weights(features, weights_key)
    spec = get_backbone(features.backbone, features.weights_arg)
    extractor = build_extractor(
        spec, image_size=features.image_size, weights=features.weights_arg, pooling=features.pooling
    )
    return image_classifier(
        extractor, head.logits_model(), resize=spec.resize(features.image_size), name=f"{spec.model_name}_classifier"
    )


def check_same_weights(features: FeaturesConfig, weights_key: str) -> None:
    """The backbone weights must be the ones the head's features came from, or the head is meaningless."""
    if weights_identity(features.weights_arg) != weights_key:
        raise CacheError(
            f"The backbone weights {features.weights!r} are not the ones the features were "
            f"extracted with ({weights_key}). Rerun `make features` and `make head`."
        )


@dataclass(frozen=True)
class Export:
    directory: Path
    files: tuple[Path, ...]


def export_run(run_dir: Path, *, saved_model: bool = True, tflite: bool = False) -> Export:
    """Writes `<run_dir>/export/`: model.keras, saved_model/, [model.tflite], labels.txt."""
    run_dir = Path(run_dir)
    found = runs.read_run(run_dir)
    if found is None:
        raise CacheError(f"No head run in {run_dir}. Run `make head` with the same variables first.")
    record = found.config
    features = FeaturesConfig.from_dict(record["features"])
    model = build_classifier(features, load_head(run_dir), weights_key=record["features_key"]["weights"])
    out = run_dir / EXPORT_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    files = [out / KERAS_FILE, out / runs.LABELS]
    model.save(files[0])
    shutil.copy(run_dir / runs.LABELS, files[1])
    if saved_model or tflite:
        model.export(str(out / "saved_model"), format="tf_saved_model", verbose=False)
        files.append(out / "saved_model")
    if tflite:
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(out / "saved_model"))
        (out / "model.tflite").write_bytes(converter.convert())
        files.append(out / "model.tflite")
    (out / "export.json").write_text(json.dumps({"run": str(run_dir), **record}, indent=2, sort_keys=True) + "\n")
    return Export(directory=out, files=tuple(files))


def load_classifier(run_dir: Path):
    """The exported Keras model of a run and its class names."""
    import keras

    import pipeline.features.extractor  # noqa: F401  registers the Preprocess layer for deserialization

    path = Path(run_dir) / EXPORT_DIR / KERAS_FILE
    if not path.exists():
        raise CacheError(f"No exported model at {path}. Run `make export` with the same variables first.")
    names = runs.read_labels(Path(run_dir) / EXPORT_DIR)
    if _holds_hub_backbone(path):
        from pipeline.features.hub import register_layers

        register_layers()
    return keras.saving.load_model(path), names


def _holds_hub_backbone(path: Path) -> bool:
    """Whether the exported model holds a keras-hub backbone (whose classes keras-hub must register first)."""
    record = json.loads((path.parent / "export.json").read_text()) if (path.parent / "export.json").exists() else {}
    return str(record.get("features", {}).get("backbone", "")).startswith(HUB_PREFIX)


class ExportedPredictor:
    """Predictions of a run's exported Keras model (`make export`): a fine-tuned backbone's way."""

    def __init__(self, run_dir: Path) -> None:
        self.model, self.class_names = load_classifier(run_dir)

    def predict(self, paths: Iterable[Path]) -> list[tuple[Path, np.ndarray]]:
        return predict_images(self.model, self.class_names, paths)


class RuntimePredictor:
    """Predictions of a stage-2 run as stage 1 computes them: the frozen backbone on the
    inference runtime (`pipeline.features.runtimes`, verified on the first batch), then the
    head's own `predict_proba`. Images are decoded and resized exactly as stage 1 did, so
    the features are the cached ones; no export is needed.
    """

    def __init__(self, run_dir: Path, record: runs.RunRecord, *, batch_size: int = 32) -> None:
        from pipeline.features.runtimes import forward_for
        from pipeline.phases import Phases

        features = FeaturesConfig.from_dict(record.config["features"])
        check_same_weights(features, record.config["features_key"]["weights"])
        spec = get_backbone(features.backbone, features.weights_arg)
        model = build_extractor(
            spec, image_size=features.image_size, weights=features.weights_arg, pooling=features.pooling
        )
        self.features, self.batch_size = features, batch_size
        self.resize = spec.resize(features.image_size)
        self.forward = forward_for(model, features, spec, Phases())
        self.head = load_head(run_dir)
        self.class_names = runs.read_labels(run_dir)

    def predict(self, paths: Iterable[Path]) -> list[tuple[Path, np.ndarray]]:
        import tensorflow as tf

        from pipeline.images import decode_and_resize

        decoded = readable_images(list(paths), lambda data: decode_and_resize(data, self.resize))
        results = []
        while batch := list(itertools.islice(decoded, self.batch_size)):
            kept, images = zip(*batch)
            proba = self.head.predict_proba(self.forward(tf.stack(images)))
            results += [(Path(p), np.asarray(row)) for p, row in zip(kept, proba)]
        return results


def load_predictor(run_dir: Path) -> ExportedPredictor | RuntimePredictor:
    """A stage-2 run predicts on the runtime (`RuntimePredictor`); any other run through its export."""
    if not Path(run_dir).is_dir():
        raise CacheError(
            f"No run at {run_dir}. Train it first with `make head` (or `make finetune`) and the same variables."
        )
    record = runs.read_run(Path(run_dir))
    stage2 = record is not None and "features" in record.config and "finetune" not in record.config
    if stage2 and (Path(run_dir) / JSON_NAME).exists():
        return RuntimePredictor(Path(run_dir), record)
    return ExportedPredictor(Path(run_dir))


def expand_images(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and globs -> sorted image paths.

    A pattern that names nothing but holds spaces is read as several, shell-quoted:
    `make predict IMAGES="a.jpg b/"` passes one argument, and a path with spaces
    (`IMAGES="Camera Roll/"`) is found as it is before it is ever split.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found += image_files(path)
        elif path.is_file():
            found.append(path)
        elif matches := sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()):
            found += matches
        elif len(several := _shell_words(pattern)) > 1:
            found += expand_images(several)
        else:
            raise DataError(f"No image found for {pattern!r}: expected a file, a folder or a glob.")
    return found


def _shell_words(text: str) -> list[str]:
    """`text` split as a shell would (quotes group), or as one word if its quotes do not pair."""
    try:
        return shlex.split(text)
    except ValueError:
        return [text]


def predict_images(model, class_names: Sequence[str], paths: Iterable[Path]) -> list[tuple[Path, np.ndarray]]:
    """(path, probabilities (K,)) per readable image (`readable_images`).

    Images are decoded as stage 1 decodes them (`pipeline.images`, EXIF orientation
    applied); the model resizes them inside.
    """
    import tensorflow as tf

    from pipeline.images import decode_image

    results = []
    for path, image in readable_images(list(paths), decode_image):
        probabilities = model(image[tf.newaxis], training=False)
        results.append((Path(path), np.asarray(probabilities)[0]))
    return results


def readable_images(paths: Sequence[Path], decode) -> Iterator[tuple[Path, Any]]:
    """(path, `decode`d image) of each image of `paths` that can be read. The others are
    left out with one warning at the end, so one broken photo does not stop a folder;
    when none can be read, that is an error naming the first."""
    import tensorflow as tf

    from pipeline.images import tf_error_message

    unreadable = []
    for path in paths:
        try:
            image = decode(tf.io.read_file(str(path)))
        except tf.errors.OpError as err:
            unreadable.append(f"{path}: {tf_error_message(err)}")
            continue
        yield path, image
    if unreadable and len(unreadable) == len(paths):
        others = f" (nor any of the {len(paths) - 1} others)" if len(paths) > 1 else ""
        raise DataError(f"Cannot read image {unreadable[0]}{others}.")
    if unreadable:
        log.warning(
            "%d of %d images cannot be read and are left out (first: %s).",
            len(unreadable),
            len(paths),
            "; ".join(unreadable[:3]),
        )


def format_predictions(results, class_names: Sequence[str], top: int) -> list[str]:
    lines = []
    for path, proba in results:
        order = np.argsort(-proba)[:top]
        lines.append(f"{path}: " + ", ".join(f"{class_names[i]} {proba[i]:.4f}" for i in order))
    return lines


def write_csv(results, class_names: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted", *class_names])
        for image, proba in results:
            writer.writerow([str(image), class_names[int(np.argmax(proba))], *(f"{p:.6f}" for p in proba)])
    return path


def check_top(top: int, class_names: Sequence[str]) -> int:
    if top < 1:
        raise ConfigError(f"top must be >= 1. Received: top={top}.")
    return min(top, len(class_names))
