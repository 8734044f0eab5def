"""Transfer learning on cached bottleneck features.

Stage 1 (`features`) runs a frozen keras.applications backbone once over a dataset
and caches its pooled features to HDF5; stage 2 (`head`) trains light heads on them;
stage 3 (`finetune`) fine-tunes end to end. See README.md.
"""

__version__ = "0.1.0"
