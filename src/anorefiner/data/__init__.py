"""Datasets: MVTec-layout index, image/mask loading, offline demo data and texture sources."""

from .index import (
    DatasetError,
    check_category,
    index_category,
    index_dataset,
    list_categories,
    load_image,
    load_mask,
    read_index,
)

__all__ = [
    "DatasetError",
    "check_category",
    "index_category",
    "index_dataset",
    "list_categories",
    "load_image",
    "load_mask",
    "read_index",
]
