"""Per-sample source descriptors in a store, so that a SLURM array task reads only its own range.

The process that lists the dataset and opens the store (`make features`, or `python -m slurm
features` on the submitting node: `SplitJob.open`) writes them once:

    _sources/samples/000000.json ...  samples [k * PER_FILE, (k + 1) * PER_FILE) in storage order:
                                      {"first": k * PER_FILE, "samples": [{"name", "hw": [H, W],
                                      "source_index", "gt": ref, "lq": ref or null}, ...]}
    _sources/samples/index.json       {"format", "version", "n", "per_file", "files", "paired"};
                                      written last: without it the descriptors do not count

A ref says where one side of a pair is, relative to the dataset folder (never an absolute path):
{"file": "train/gt/a.png"}, {"mat": "ValidationGtBlocksSrgb.mat", "variable": ..., "block": k},
{"frame": "short_sid2/1001/a.npy", "size": [W, H], "reverse": true}, or {"demo": photo, "y", "x"}.
An array task of [start, stop) reads index.json and the files covering its range, and builds its
Samples with pipeline.sources' loaders: it never lists or stats the dataset folder.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stores import write_json_atomic
from stores.store import SOURCES_DIR, StoreError, atomic_path

from .sources import Sample, Source, sample_of

FOLDER = "samples"
INDEX = "index.json"
FORMAT, VERSION = "ptgrm-sample-descriptors", 1
PER_FILE = 4096  # samples per descriptor file (~100-200 bytes each: about 0.4-0.8 MB per file)


def folder(store_path) -> Path:
    return Path(store_path) / SOURCES_DIR / FOLDER


def chunk_name(k: int) -> str:
    return f"{k:06d}.json"


def write_descriptors(store_path, source: Source, order, per_file: int | None = None) -> bool:
    """Write the descriptors of a store's samples (storage order `order[i]` = source index) unless
    a complete set is there already; True when written."""
    d, per_file = folder(store_path), per_file or PER_FILE
    if (d / INDEX).is_file():
        return False
    n = len(order)
    for k, first in enumerate(range(0, n, per_file)):
        rows = []
        for i in range(first, min(n, first + per_file)):
            s = source.samples[int(order[i])]
            rows.append(
                {
                    "name": s.name,
                    "hw": [int(v) for v in s.hw],
                    "source_index": int(order[i]),
                    **s.ref,
                }
            )
        with atomic_path(
            d / chunk_name(k)
        ) as tmp:  # compact: one line per file, never half-written
            tmp.write_text(json.dumps({"first": first, "samples": rows}, separators=(",", ":")))
    write_json_atomic(
        d / INDEX,
        {
            "format": FORMAT,
            "version": VERSION,
            "n": n,
            "per_file": per_file,
            "files": -(-n // per_file),
            "paired": source.paired,
        },
    )
    return True


class Descriptors:
    """The samples of a store read back from its descriptors, one file at a time as needed."""

    def __init__(self, store_path, root: Path | None):
        self.dir, self.root = folder(store_path), root
        try:
            self.index = json.loads((self.dir / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise StoreError(
                f"{store_path}: no complete sample descriptors ({self.dir / INDEX}: {e}); "
                f"`python -m slurm features` or `make features` writes them"
            ) from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise StoreError(f"{self.dir / INDEX}: not {FORMAT} version {VERSION}")
        self.read_files: list[int] = []  # which descriptor files this process read, in order
        self._file = lru_cache(maxsize=2)(self._load)

    @property
    def n(self) -> int:
        return self.index["n"]

    def _load(self, k: int) -> list:
        self.read_files.append(k)
        return json.loads((self.dir / chunk_name(k)).read_text())["samples"]

    def sample_at(self, i: int) -> tuple[int, Sample]:
        """(source index, Sample) of sample i (storage order)."""
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} is out of range for {self.n} samples")
        per = self.index["per_file"]
        rec = self._file(i // per)[i % per]
        return rec["source_index"], sample_of(
            self.root,
            rec["name"],
            rec["hw"],
            {k: v for k, v in rec.items() if k not in ("name", "hw", "source_index")},
        )
