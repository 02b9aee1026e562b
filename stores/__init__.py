"""Feature stores: the contract between `pipeline` (writes) and `training` (reads).

Depends only on numpy, zarr, numcodecs and the standard library. `python -m stores --help`.
"""
from .keys import SCHEMA_VERSION, canonical_json, key_of, sha256_file
from .store import (ArraySpec, Store, StoreError, atomic_path, dataset_name, encoder_id, make_plan,
                    store_name, write_json_atomic)

__all__ = ["SCHEMA_VERSION", "ArraySpec", "Store", "StoreError", "atomic_path", "canonical_json",
           "dataset_name", "encoder_id", "key_of", "make_plan", "sha256_file", "store_name",
           "write_json_atomic"]
