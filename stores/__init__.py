"""Feature stores: the contract between `pipeline` (writes) and `training` (reads).

Depends on numpy, zarr, numcodecs and the standard library; `remote` adds fsspec (s3fs for s3://),
`python -m stores info --stats` dask, `python -m stores catalog` Pillow. `python -m stores --help`.
"""

from .keys import SCHEMA_VERSION, canonical_json, key_of, sha256_file
from .layout import Bucket, Layout, decode_text, encode_text, make_layout
from .leases import Leases, store_lock
from .remote import RemoteError, copy_store
from .store import (
    TEXT,
    ArraySpec,
    Samples,
    Store,
    StoreError,
    atomic_path,
    dataset_name,
    encoder_id,
    match_member,
    store_name,
    write_json_atomic,
)
from .wds import export_wds

__all__ = [
    "SCHEMA_VERSION",
    "TEXT",
    "ArraySpec",
    "Bucket",
    "Layout",
    "Leases",
    "store_lock",
    "RemoteError",
    "Samples",
    "Store",
    "StoreError",
    "atomic_path",
    "canonical_json",
    "copy_store",
    "dataset_name",
    "decode_text",
    "encode_text",
    "encoder_id",
    "export_wds",
    "key_of",
    "make_layout",
    "match_member",
    "sha256_file",
    "store_name",
    "write_json_atomic",
]
