"""Where each sample lives in a store (schema 2): size buckets, byte-sized shards, ranges, text rows.

A store's samples are grouped into *buckets* by their size rounded up to the spatial tile: bucket
`h448w640` holds every sample whose valid size rounds up to 448 x 640. Every array of every member
is stored once per bucket (`<member>/<bucket>/<array>`, axis 0 = the bucket's rows), so an image
is stored and held in memory at its own size rounded up to the tile, whatever else is in the split;
a portrait and a landscape photo land in different buckets and cost nothing extra.

The sample index readers see is the *storage order*: buckets in the order their first sample
appears in the source, and within a bucket the source order. A split of equal-size samples keeps
the source order. `source_index` (per sample) maps back, and seeds the degradation.

Each bucket's rows are grouped in shards of `shard_len` rows, fewer for large images so that a
shard holds at most about `shard_bytes` of float16 pixels (one 12 MP photo is a shard of its own).
Extraction *ranges* are runs of whole shards in storage order, `[start, stop)` of the sample index:
one writer leases a range and writes one done marker for it (the manifest and the markers call a
range a "task", field names kept for compatibility). Everything here is a pure function of the
samples' sizes and the settings, so the ranges are never stored: the manifest keeps the bucket table (bounded by the number of distinct sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIXEL_BYTES = 6  # the widest image array per pixel: float16 base, 3 channels


@dataclass(frozen=True)
class Bucket:
    hw: tuple  # canvas (H, W): the size of its samples rounded up to the tile
    start: int  # first sample index (storage order)
    count: int
    shard_len: int  # rows per shard

    @property
    def name(self) -> str:
        return f"h{self.hw[0]}w{self.hw[1]}"

    def shards(self) -> list[tuple[int, int]]:
        """[start, stop) sample ranges of this bucket's shards."""
        return [
            (a, min(a + self.shard_len, self.start + self.count))
            for a in range(self.start, self.start + self.count, self.shard_len)
        ]

    def to_json(self) -> list:
        return [self.hw[0], self.hw[1], self.start, self.count, self.shard_len]


@dataclass(frozen=True)
class Layout:
    tile: int
    buckets: tuple  # of Bucket, in storage order

    @property
    def n(self) -> int:
        return sum(b.count for b in self.buckets)

    def to_json(self) -> dict:
        return {"tile": self.tile, "buckets": [b.to_json() for b in self.buckets]}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(d["tile"], tuple(Bucket((h, w), s, c, k) for h, w, s, c, k in d["buckets"]))

    def _cached(self, name: str, make):
        """A derived value computed once per layout (the layout itself never changes)."""
        if name not in self.__dict__:
            object.__setattr__(self, name, make())
        return self.__dict__[name]

    def shards(self) -> list[tuple[int, int, int]]:
        """(bucket number, start, stop) of every shard, in storage order."""
        return self._cached(
            "_shards",
            lambda: [(k, a, b) for k, bk in enumerate(self.buckets) for a, b in bk.shards()],
        )

    def shards_of(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """The shards inside [start, stop) (a binary search: a range costs O(log shards))."""
        shards = self.shards()
        firsts = self._cached(
            "_shard_starts", lambda: np.array([a for _, a, _ in shards], np.int64)
        )
        lo, hi = np.searchsorted(firsts, [start, stop], side="left")
        return [s for s in shards[lo:hi] if s[2] <= stop]

    def locate(self, i: int) -> tuple[int, int]:
        """(bucket number, row in the bucket) of sample i."""
        starts = self._starts()
        k = int(np.searchsorted(starts, i, side="right")) - 1
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} is out of range for {self.n} samples")
        return k, i - self.buckets[k].start

    def _starts(self) -> np.ndarray:
        return self._cached(
            "_starts_cache", lambda: np.array([b.start for b in self.buckets], np.int64)
        )

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """[start, stop) cut at bucket edges: (bucket number, first row, last row + 1)."""
        out = []
        for k, b in enumerate(self.buckets):
            lo, hi = max(start, b.start), min(stop, b.start + b.count)
            if lo < hi:
                out.append((k, lo - b.start, hi - b.start))
        return out

    def ranges(self, n: int | None = None) -> list[list[int]]:
        """Ranges of whole shards, `[[start, stop], ...]` in storage order: one per shard, or
        exactly `n` runs of shards, balanced by pixel bytes (greedily)."""
        return self._cached(f"_ranges_{n or 0}", lambda: self._ranges(n))

    def _ranges(self, n: int | None) -> list[list[int]]:
        shards = self.shards()
        if not n or n >= len(shards):
            return [[a, b] for _, a, b in shards]
        cost = [(b - a) * self.buckets[k].hw[0] * self.buckets[k].hw[1] for k, a, b in shards]
        out, first, acc, left = [], 0, 0.0, float(sum(cost))
        for j, c in enumerate(cost):
            acc += c
            todo = n - len(out)  # ranges still to cut, this one included
            if todo > 1 and (acc >= left / todo or len(shards) - j - 1 == todo - 1):
                out.append([shards[first][1], shards[j][2]])
                first, left, acc = j + 1, left - acc, 0.0
        out.append([shards[first][1], shards[-1][2]])
        return out


def bucket_hw(hw, tile: int) -> tuple:
    """The canvas of a sample of valid size hw: rounded up to the tile (at least one tile)."""
    return tuple(max(tile, -(-int(v) // tile) * tile) for v in hw)


def make_layout(
    hws, tile: int, shard_len: int = 16, shard_bytes: float = 64e6
) -> tuple[Layout, np.ndarray]:
    """The layout of samples with valid sizes `hws` (source order) and the storage order:
    `order[i]` is the source index of sample i."""
    canvases = [bucket_hw(hw, tile) for hw in hws]
    first: dict[tuple, list] = {}
    for j, c in enumerate(canvases):
        first.setdefault(c, []).append(j)
    buckets, order, start = [], [], 0
    for c, members in first.items():
        per_shard = max(1, min(shard_len, int(shard_bytes // (c[0] * c[1] * PIXEL_BYTES))))
        buckets.append(Bucket(c, start, len(members), per_shard))
        order += members
        start += len(members)
    return Layout(tile, tuple(buckets)), np.array(order, np.int64)


# -- text as bytes: Zarr v3's core data types have no strings --------------------------------
def encode_text(values, width: int, where: str = "") -> np.ndarray:
    """(n, width) uint8 rows: each value's UTF-8, NUL-padded; a longer value is an error."""
    out = np.zeros((len(values), width), np.uint8)
    for j, v in enumerate(values):
        raw = str(v).encode()
        if len(raw) > width:
            raise ValueError(
                f"{where}: value {j} is {len(raw)} bytes of UTF-8, more than the {width} "
                f"this array holds: {str(v)[:60]!r}..."
            )
        out[j, : len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def decode_text(rows: np.ndarray) -> list[str]:
    """The strings of (n, width) uint8 rows written by encode_text."""
    rows = np.asarray(rows, np.uint8)
    return [bytes(r).rstrip(b"\0").decode() for r in rows.reshape(-1, rows.shape[-1])]
