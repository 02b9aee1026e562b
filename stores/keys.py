"""Content keys: the sha256 of the canonical JSON of everything that determines a member.

Used by `pipeline` to name what it asks for and by `stores` to refuse a member that differs.
"""

import hashlib
import json

SCHEMA_VERSION = 2


def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace: equal specs give equal strings."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def key_of(spec: dict) -> str:
    """sha256 hex digest of the canonical JSON of `spec` plus the schema version."""
    payload = canonical_json({"schema": SCHEMA_VERSION, "spec": spec})
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()
