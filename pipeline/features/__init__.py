"""Stage 1, `make features`: data sources, the backbone registry, extraction engines and the HDF5 feature store."""
