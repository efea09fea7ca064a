"""Datasets, images and splits: everything between files on disk and a table of labelled images."""

from dermlab.data.datasets import (
    HAM10000_CLASSES,
    LAYOUTS,
    DatasetTable,
    detect_layout,
    load_dataset,
)
from dermlab.data.images import open_image_bytes, read_image
from dermlab.data.splits import create_splits, load_splits, save_splits, split_count_table

__all__ = [
    "HAM10000_CLASSES",
    "LAYOUTS",
    "DatasetTable",
    "detect_layout",
    "load_dataset",
    "read_image",
    "open_image_bytes",
    "create_splits",
    "save_splits",
    "load_splits",
    "split_count_table",
]
