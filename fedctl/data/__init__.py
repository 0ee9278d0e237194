"""Datasets for fedctl: the IDX loader, the dataset registry with checksums and downloads, a data holder's own
dataset (.npz, CSV, Parquet, image folders), partitioning, shards."""

from fedctl.data.datasets import DATASETS, DatasetSpec, get_dataset, load_dataset, locate_dataset
from fedctl.data.download import download, fetch_dataset
from fedctl.data.idx import read_idx, write_idx
from fedctl.data.local import LocalData, load_local, split_holdout
from fedctl.data.partition import (
    by_label_shards,
    dirichlet_label_skew,
    iid,
    quantity_skew,
    write_local_partition,
    write_partition,
)
from fedctl.data.shards import (
    Shard,
    list_shards,
    load_shard,
    load_split_as_shard,
    normalize,
    read_manifest,
    shard_from_local,
    with_holdout,
)

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "LocalData",
    "Shard",
    "by_label_shards",
    "dirichlet_label_skew",
    "download",
    "fetch_dataset",
    "get_dataset",
    "iid",
    "list_shards",
    "load_dataset",
    "load_local",
    "load_shard",
    "load_split_as_shard",
    "locate_dataset",
    "normalize",
    "quantity_skew",
    "read_idx",
    "read_manifest",
    "shard_from_local",
    "split_holdout",
    "with_holdout",
    "write_idx",
    "write_local_partition",
    "write_partition",
]
