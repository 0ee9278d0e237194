"""Datasets for fedctl: the IDX loader, the dataset registry with checksums and downloads, partitioning, shards."""

from fedctl.data.datasets import DATASETS, DatasetSpec, get_dataset, load_dataset, locate_dataset
from fedctl.data.download import download, fetch_dataset
from fedctl.data.idx import read_idx, write_idx
from fedctl.data.partition import by_label_shards, iid, write_partition
from fedctl.data.shards import Shard, list_shards, load_shard, load_split_as_shard, normalize, read_manifest

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Shard",
    "by_label_shards",
    "download",
    "fetch_dataset",
    "get_dataset",
    "iid",
    "list_shards",
    "load_dataset",
    "load_shard",
    "load_split_as_shard",
    "locate_dataset",
    "normalize",
    "read_idx",
    "read_manifest",
    "write_idx",
    "write_partition",
]
