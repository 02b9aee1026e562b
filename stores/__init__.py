"""Feature stores: the contract between `pipeline` (writes) and `training` (reads).

Depends on numpy, zarr, numcodecs and the standard library; `remote` adds fsspec (s3fs for s3://),
`python -m stores info --stats` dask. `python -m stores --help`.
"""
from .keys import SCHEMA_VERSION, canonical_json, key_of, sha256_file
from .leases import Leases, store_lock
from .remote import RemoteError, copy_store
from .store import (ArraySpec, Store, StoreError, atomic_path, dataset_name, encoder_id, make_plan,
                    store_name, write_json_atomic)
from .wds import export_wds

__all__ = ["SCHEMA_VERSION", "ArraySpec", "Leases", "store_lock", "RemoteError", "Store", "StoreError", "atomic_path",
           "canonical_json", "copy_store", "dataset_name", "encoder_id", "export_wds", "key_of", "make_plan",
           "sha256_file", "store_name", "write_json_atomic"]
