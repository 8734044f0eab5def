"""Pictures of a feature file's rows: the images behind some positions of a split, for grids and fine-tuning."""

from __future__ import annotations

from pathlib import Path

from pipeline.features.backbones import input_resize
from pipeline.features.data import load_source
from pipeline.images import decode_and_resize, read_image_file


def load_images(config, split: str, positions, *, source=None):
    """The images at `positions` of a split, decoded and resized as the backbone saw them.

    position -> float32 (S, S, 3) in [0, 255]. Reads the data source with TensorFlow;
    `read_images` is the cheap way to get pictures of an image folder. `source`: the
    `DataSource` of `config` when the caller has it loaded already; None loads it.
    """
    source = source or load_source(config.data, seed=config.seed)
    resize = input_resize(config)
    records = source.splits[split].at(positions).records(0)
    return {int(r["index"]): decode_and_resize(r["image"], resize).numpy() for r in records}


def read_images(config, split: str, ids_at, *, size: int = 160):
    """Pictures of some examples of a split: {position: uint8 (H, W, 3)}; unreadable ones left out.

    `ids_at` maps each position to its id (a path under the image folder, or a tfds id).
    Image folders are read with PIL (`read_image_file`); tfds examples through the
    stage-1 decoder (`load_images`).
    """
    import numpy as np

    if config.data.data_dir is not None:
        root, found = Path(config.data.data_dir), {}
        for position, image_id in ids_at.items():
            try:
                found[int(position)] = read_image_file(root / str(image_id), size)
            except (OSError, ValueError):
                continue
        return found
    decoded = load_images(config, split, np.fromiter(ids_at, np.int64))
    return {p: np.clip(image, 0, 255).astype(np.uint8) for p, image in decoded.items()}
