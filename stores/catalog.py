"""What a root of stores holds, read from manifests only: `python -m stores ls|info` on a local
folder, a shared path or `s3://bucket/prefix`, and `python -m stores catalog`.

A remote store is described by its `manifest.json` and a listing of its done markers (names, not
contents): no array data is read, so listing a team's root costs a few KB per store. Each store is
compared with the local store root (`--local`, default data/stores): whether a copy is there and
which of its members are complete with the same keys.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from common.privacy import scrub, shareable

from .remote import Location, open_location, plain_errors, read_manifest
from .store import (
    DONE_DIR,
    FINGERPRINT_BYTES,
    MANIFEST,
    DamagedFile,
    Store,
    StoreError,
    check_member_name,
    check_schema,
    range_of,
    shard_file,
)


def is_url(root) -> bool:
    return "://" in str(root)


def local_done(store: Store, members) -> dict[str, int]:
    return {m: len(store.done_ranges(m)) for m in members}


def remote_done(loc: Location, members) -> dict[str, int]:
    """Done markers per member, from one listing of `_done/` (no file is read)."""
    prefix = loc.path(DONE_DIR)
    found = loc.fs.find(prefix) if loc.fs.exists(prefix) else []
    counts = dict.fromkeys(members, 0)
    for p in found:
        member = posixpath.dirname(posixpath.relpath(p, prefix))
        if member in counts and p.endswith(".json") and not posixpath.basename(p).startswith("."):
            counts[member] += 1
    return counts


def with_status(manifest: dict, done: dict[str, int]) -> dict:
    """The manifest with each member's `tasks_done` and status recomputed from its done markers."""
    for name, info in manifest["members"].items():
        info["tasks_done"] = f"{done.get(name, 0)}/{info.get('tasks', 0)}"
        if info.get("status") == "complete" and done.get(name, 0) != info.get("tasks", 0):
            info["status"] = "damaged"
    return manifest


def read_store(path, endpoint_url: str | None = None) -> dict:
    """A store's manifest with recomputed status, from a local path or a URL (manifest and a
    listing only)."""
    if not is_url(path):
        store = Store(path)
        return with_status(store.manifest(), local_done(store, store.manifest()["members"]))
    with plain_errors(str(path)):
        loc = open_location(str(path), endpoint_url)
        m = json.loads(read_manifest(loc))
    check_schema(loc.url, m)
    for member in m["members"]:
        check_member_name(loc.url, member)
    with plain_errors(str(path)):
        return with_status(m, remote_done(loc, m["members"]))


def store_paths(root, endpoint_url: str | None = None) -> list[str]:
    """The stores (folders holding a manifest.json) directly under `root`, sorted."""
    if not is_url(root):
        return [str(p.parent) for p in sorted(Path(root).glob(f"*/{MANIFEST}"))]
    with plain_errors(str(root)):
        loc = open_location(str(root), endpoint_url)
        loc.fs.invalidate_cache()
        found = loc.fs.glob(loc.path(f"*/{MANIFEST}"))
        return sorted(loc.child(posixpath.basename(posixpath.dirname(p))).url for p in found)


def local_copy(local_root, name: str, manifest: dict) -> dict:
    """Whether `local_root/name` holds the store, and each member's status there (with the same key)."""
    path = Path(local_root) / name
    if not (path / MANIFEST).is_file():
        return {"path": str(path), "exists": False, "complete": False, "members": {}}
    try:
        mine = read_store(path)["members"]
    except StoreError as e:
        return {
            "path": str(path),
            "exists": True,
            "complete": False,
            "members": {},
            "error": scrub(str(e)),
        }
    members = {}
    for m, info in manifest["members"].items():
        got = mine.get(m)
        members[m] = (
            "missing"
            if got is None
            else "other key"
            if got.get("key") != info.get("key")
            else got.get("status", "incomplete")
        )
    wanted = [m for m, i in manifest["members"].items() if i.get("status") == "complete"]
    return {
        "path": str(path),
        "exists": True,
        "complete": all(members[m] == "complete" for m in wanted),
        "members": members,
    }


def same_folder(a, b) -> bool:
    return not is_url(a) and not is_url(b) and Path(a).resolve() == Path(b).resolve()


def summary(path: str, manifest: dict, local_root=None) -> dict:
    """One row of `ls`: the store, its members (status, short key, weights, bytes, provenance)."""
    name = posixpath.basename(str(path).rstrip("/"))
    row = {
        "store": name,
        "path": str(path),
        "created": manifest.get("created"),
        "members": {m: i.get("status", "incomplete") for m, i in manifest["members"].items()},
        "details": {
            m: {
                "status": i.get("status", "incomplete"),
                "key": str(i.get("key", ""))[:12],
                "weights": i.get("weights"),
                "bytes": i.get("bytes"),
                "tasks_done": i.get("tasks_done"),
                "completed": i.get("completed"),
                "provenance": i.get("provenance"),
            }
            for m, i in manifest["members"].items()
        },
    }
    if local_root is not None and not same_folder(
        posixpath.dirname(str(path).rstrip("/")), local_root
    ):
        row["local"] = local_copy(local_root, name, manifest)
    return row


def list_root(root, local_root=None, endpoint_url: str | None = None) -> list[dict]:
    """A row per store under `root` (one damaged store is named; the others are still listed)."""
    rows = []
    for path in store_paths(root, endpoint_url):
        try:
            rows.append(summary(path, read_store(path, endpoint_url), local_root))
        except StoreError as e:
            rows.append(
                {
                    "store": posixpath.basename(path),
                    "path": path,
                    "members": {},
                    "error": scrub(str(e)),
                }
            )
    return rows


# -- the catalogue page: `python -m stores catalog ROOT --html OUT` --------------------------------
THUMB = 128  # px, the longest side of a thumbnail


def open_array(path: str, rel: str, endpoint_url: str | None = None):
    """One zarr array of a store read-only, local or remote (only the chunks indexed are read)."""
    import zarr

    if is_url(path):
        from zarr.storage import FsspecStore

        from .remote import storage_options

        url = f"{path.rstrip('/')}/{rel}"
        return zarr.open_array(
            FsspecStore.from_url(
                url, storage_options=storage_options(url, endpoint_url), read_only=True
            ),
            mode="r",
            zarr_format=3,
        )
    return zarr.open_array(str(Path(path) / rel), mode="r", zarr_format=3)


def first_sample(path: str, manifest: dict, target: str, endpoint_url: str | None = None) -> dict:
    """lq and base (uint8, at the sample's size) of the first usable sample of the first bucket
    (storage order: its rows are samples 0, 1, ...). A local store's reads check that each shard
    file is the one its done marker vouches for (a lost one raises instead of reading as zeros)."""
    import numpy as np

    from .layout import Layout

    layout = Layout.from_json(manifest["layout"])
    bucket = layout.buckets[0].name
    if is_url(path):

        def read(member: str, name: str, row: int):
            check_remote_shard(
                path, layout, manifest["members"][member], member, name, row, endpoint_url
            )
            return open_array(path, f"{member}/{bucket}/{name}", endpoint_url)[row]
    else:
        store = Store(path)
        read = lambda member, name, row: store.array(member, name)[row]  # noqa: E731
    hw = np.asarray(open_array(path, f"pairs/{bucket}/hw", endpoint_url)[:])
    row = int(np.argmax(hw[:, 0] > 0))
    h, w = (int(x) for x in hw[row])
    if not h:
        raise StoreError("no usable sample in the first bucket")
    lq = np.asarray(read("pairs", "lq", row))[:h, :w]
    base = np.asarray(read(target, "base", row))[:h, :w].astype(np.float32)
    return {"lq": lq, "base": (np.clip(np.nan_to_num(base), 0, 1) * 255 + 0.5).astype(np.uint8)}


def check_remote_shard(
    path: str, layout, info: dict, member: str, name: str, row: int, endpoint_url: str | None = None
) -> None:
    """The shard file holding `row` (of the first bucket) of a remote store is the one its done
    marker vouches for: its size and trailing crc32c (one ranged read of 4 bytes), as a local store's
    reads check it. Zarr would read a lost object as zeros and a swapped one as the wrong pixels."""
    loc = open_location(path, endpoint_url)
    rel = shard_file(layout, member, name, info["arrays"][name], 0, row)
    b = layout.buckets[0]
    lo = b.start + row // b.shard_len * b.shard_len
    r = range_of(layout, info, lo)
    marker_rel = f"{DONE_DIR}/{member}/{r:05d}.json"
    with plain_errors(path):
        try:
            marker = json.loads(loc.fs.cat_file(loc.path(marker_rel)))
        except FileNotFoundError:
            raise StoreError(
                f"{loc.url}: done marker {marker_rel} of member {member} is missing: pull the "
                f"store again from a complete copy, or run `python -m stores repair` there"
            ) from None
        want = ((marker.get("files") or {}).get(name) or {}).get(str(lo))
        if not isinstance(want, str):
            return  # a marker made before fingerprints were recorded: nothing to compare with
        size, got = int(want.split(":")[0]), None
        try:
            real = int(loc.fs.info(loc.path(rel))["size"])
            tail = loc.fs.cat_file(loc.path(rel), start=max(0, real - FINGERPRINT_BYTES), end=real)
            got = f"{real}:{tail.hex()}"
        except FileNotFoundError:
            pass
    if got != want:
        raise DamagedFile(
            f"{loc.url}: shard file {rel} of member {member} is "
            f"{'missing' if got is None else 'not the file written'} (size:crc32c {got}; its done "
            f"marker {marker_rel} vouches for {size} bytes, {want}): run `python -m stores repair` "
            f"on the store that was pushed, then push it again, or pull it from a complete copy"
        )


def png_data_uri(image) -> str:
    import base64
    import io

    from PIL import Image

    im = Image.fromarray(image[..., :3] if image.shape[-1] >= 3 else image[..., 0])
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_gains(runs) -> list[dict]:
    """The runs under `runs` (folders with an eval.json): store names, members read, PSNR gain."""
    out = []
    for f in sorted(Path(runs).glob("*/eval.json")) if runs else []:
        try:
            r = json.loads(f.read_text())
            out.append(
                {
                    "run": f.parent.name,
                    "stores": {r.get("store"), r.get("train_store")},
                    "members": {r.get("target"), *(r.get("encoder") or [])},
                    "gain": float(r["gain_psnr"]),
                    "ci95": r.get("gain_psnr_ci95"),
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unfinished or foreign run folder: not listed
    return out


def _td(text) -> str:
    import html

    return f"<td>{html.escape('' if text is None else str(text))}</td>"


def store_html(row: dict, manifest: dict | None, runs: list, endpoint_url: str | None) -> str:
    """One store's section: its members' table and, for complete members, thumbnails."""
    import html

    from .provenance import describe as describe_provenance

    name = html.escape(row["store"])
    if "error" in row:
        return f"<section><h2>{name}</h2><p class=damaged>DAMAGED: {html.escape(row['error'])}</p></section>"
    parts = [
        f"<section><h2>{name}</h2>",
        f"<p>{html.escape(shareable(str(row['path'])))} &middot; {html.escape(manifest.get('dataset', '?'))} / "
        f"{html.escape(manifest.get('split', '?'))} / {html.escape(manifest.get('task', '?'))} &middot; "
        f"created {html.escape(str(row.get('created')))}</p>",
    ]
    if row.get("local"):
        local = row["local"]
        state = "none" if not local["exists"] else "complete" if local["complete"] else "incomplete"
        parts.append(f"<p>local copy: {state} ({html.escape(shareable(local['path']))})</p>")
    parts.append(
        "<table><tr><th>member</th><th>status</th><th>ranges</th><th>key</th><th>weights</th><th>MB</th>"
        "<th>made by</th><th>runs (PSNR gain)</th></tr>"
    )
    for m, d in row["details"].items():
        used = [
            r for r in runs if row["store"] in r["stores"] and (m in r["members"] or m == "pairs")
        ]
        gains = ", ".join(f"{r['run']} {r['gain']:+.2f} dB" for r in used)
        parts.append(
            "<tr>"
            + "".join(
                _td(x)
                for x in (
                    m,
                    d["status"],
                    d["tasks_done"],
                    d["key"],
                    d["weights"],
                    f"{(d['bytes'] or 0) / 1e6:.2f}",
                    describe_provenance(d["provenance"]),
                    gains,
                )
            )
            + "</tr>"
        )
    parts.append("</table>")
    complete = [m for m, s in row["members"].items() if s == "complete"]
    targets = [m for m in complete if m.startswith("targets/")]
    if "pairs" in complete and targets:
        try:
            for t in targets:
                imgs = first_sample(row["path"], manifest, t, endpoint_url)
                parts.append(
                    f"<figure><img src='{png_data_uri(imgs['lq'])}' alt='lq'>"
                    f"<img src='{png_data_uri(imgs['base'])}' alt='base'>"
                    f"<figcaption>first sample: lq, base of {html.escape(t)}</figcaption></figure>"
                )
        except Exception as e:  # a damaged array: said, no broken image
            why = html.escape(scrub(f"{type(e).__name__}: {e}"))
            parts.append(f"<p class=damaged>thumbnails unavailable: {why}</p>")
    return "\n".join(parts + ["</section>"])


STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
    "padding:2px 6px;font-size:90%;text-align:left}.damaged{color:#b00}figure{display:inline-block}"
    "img{height:96px;margin-right:4px;image-rendering:pixelated}"
)


def write_catalog(root, out, runs=None, local_root=None, endpoint_url: str | None = None) -> Path:
    """One static, self-contained HTML page (thumbnails as data: URIs) of every store under `root`."""
    import html

    from .store import atomic_path

    rows = list_root(root, local_root, endpoint_url)
    gains = run_gains(runs)
    sections = []
    for row in rows:
        manifest = None if "error" in row else read_store(row["path"], endpoint_url)
        sections.append(store_html(row, manifest, gains, endpoint_url))
    title = f"Feature stores under {shareable(scrub(str(root)))}"
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + ("\n".join(sections) or "<p>no stores</p>")
        + "\n</body></html>\n"
    )
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
