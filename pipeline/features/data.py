"""The data behind stage 1: an image folder or a tensorflow-datasets dataset, one entry point."""

from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.features.sources import DataSource, folder_source, scan_folder
from pipeline.features.tfds_data import tfds_source


def load_source(config: DataConfig, *, seed: int, shard_index: int = 0, num_shards: int = 1) -> DataSource:
    """The one entry point: a `DataSource` for either kind of data."""
    if config.data_dir is not None:
        return folder_source(scan_folder(config, seed=seed), shard_index=shard_index, num_shards=num_shards)
    return tfds_source(config, shard_index=shard_index, num_shards=num_shards)
