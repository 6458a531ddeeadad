"""Data: datasets by name, transform presets, and loaders."""
from .datasets import DATASETS, DatasetInfo, canonical_dataset, dataset_names, load_raw, seeded_split
from .loaders import DataBundle, build_data, set_epoch
from .transforms import MixCollate

__all__ = ["DATASETS", "DataBundle", "DatasetInfo", "MixCollate", "build_data", "canonical_dataset", "dataset_names", "load_raw",
           "seeded_split", "set_epoch"]
