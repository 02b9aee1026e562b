"""`python -m pipeline weights get NAME`: published checkpoints downloaded when online into the
caches `make features` searches. A local HTTP server stands in for the Hugging Face hub
(`HF_ENDPOINT`) and for GitHub's release files (`PTGRM_GITHUB_MIRROR`); never the internet."""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.download import DownloadError, download
from pipeline.encoders import WeightsNotFound, _hf_cached_checkpoint, build_encoder
from pipeline.networks import build_network_target
from pipeline.weights import cached_target_checkpoint
from ptgrm.checkpoints import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CLIP_REPO = (
    "timm/vit_base_patch32_clip_224.openai"  # OpenCLIP's hub entry of ViT-B-32-quickgelu:openai
)
RELEASE = "/swz30/Restormer/releases/download/v1.0/"


class Server:
    """HEAD/GET of `files` (path -> bytes) as the hub answers them (commit, etag = sha256, size);
    404 with the hub's EntryNotFound code otherwise. `cut` paths announce their full size but
    send half, then close (a dropped connection)."""

    def __init__(self, files: dict, cut=(), etag=None):
        files, cut = dict(files), set(cut)

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                data = files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{etag or hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.end_headers()
                if body:
                    self.wfile.write(data[: len(data) // 2] if self.path in cut else data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    files = {
        f"/{CLIP_REPO}/resolve/main/open_clip_model.safetensors": b"clip weights " * 1000,
        RELEASE + "motion_deblurring.pth": b"restormer weights " * 1000,
        RELEASE + "deraining.pth": b"cut short " * 1000,
    }
    s = Server(files, cut={RELEASE + "deraining.pth"})
    s.files = files
    yield s
    s.close()


def weights_get(name: str, env: dict) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PTGRM_WEIGHTS"
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "weights", "get", name],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env={**clean, **env},
        timeout=120,
    )


def test_clip_comes_from_the_hub_into_the_cache_features_searches(server, tmp_path, monkeypatch):
    out = weights_get("clip-vit-b32", {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 0, out.stderr[-2000:]
    data = server.files[f"/{CLIP_REPO}/resolve/main/open_clip_model.safetensors"]
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in out.stdout
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    found = _hf_cached_checkpoint(
        "ViT-B-32-quickgelu", "openai"
    )  # what make features loads, offline
    assert found is not None and found.read_bytes() == data


def test_a_hub_file_that_is_not_what_the_hub_says_is_not_kept(tmp_path, monkeypatch):
    path = f"/{CLIP_REPO}/resolve/main/open_clip_model.safetensors"
    wrong = Server({path: b"damaged " * 100}, etag="ab" * 32)
    try:
        out = weights_get(
            "clip-vit-b32", {"HF_ENDPOINT": wrong.url, "HF_HOME": str(tmp_path / "hf")}
        )
    finally:
        wrong.close()
    assert out.returncode == 1 and f"differs from the hub's {'ab' * 32}" in out.stderr, out.stderr[
        -2000:
    ]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert (
        _hf_cached_checkpoint("ViT-B-32-quickgelu", "openai") is None
    )  # make features does not find it


def test_a_target_comes_from_its_release_url_into_the_cache_features_searches(
    server, tmp_path, monkeypatch
):
    env = {"PTGRM_GITHUB_MIRROR": server.url, "PTGRM_WEIGHTS": str(tmp_path / "w")}
    out = weights_get("restormer-deblur", env)
    assert out.returncode == 0, out.stderr[-2000:]
    data = server.files[RELEASE + "motion_deblurring.pth"]
    dest = tmp_path / "w" / "motion_deblurring.pth"
    assert (
        dest.read_bytes() == data
        and f"{dest}\nsha256 {hashlib.sha256(data).hexdigest()}" in out.stdout
    )
    assert (
        "already in the cache" in weights_get("restormer-deblur", env).stdout
    )  # not downloaded twice
    monkeypatch.setenv("PTGRM_WEIGHTS", str(tmp_path / "w"))
    assert cached_target_checkpoint("restormer-deblur") == dest
    with pytest.raises(
        CheckpointError, match="motion_deblurring.pth: not a readable torch checkpoint"
    ):  # loaded
        build_network_target("restormer-deblur", device="cpu")
    build_network_target(
        "restormer-deblur:dim=8:num_blocks=1,1,1,1:num_refinement_blocks=1",
        allow_random=True,
        device="cpu",
    )  # another configuration: random weights, not the published file


def test_a_dropped_connection_or_a_wrong_sha256_leaves_no_file(server, tmp_path):
    dest = tmp_path / "w" / "deraining.pth"
    with pytest.raises(DownloadError, match=r"ended after 5000 of 10000 bytes.*nothing was kept"):
        download(server.url + RELEASE + "deraining.pth", dest)
    with pytest.raises(DownloadError, match="is not the published 0000"):
        download(server.url + RELEASE + "motion_deblurring.pth", dest, sha256="0" * 64)
    assert list((tmp_path / "w").iterdir()) == []  # no file under the final name, no temporary one
    data = server.files[RELEASE + "motion_deblurring.pth"]
    assert (
        download(
            server.url + RELEASE + "motion_deblurring.pth", dest, hashlib.sha256(data).hexdigest()
        )
        == hashlib.sha256(data).hexdigest()
        and dest.read_bytes() == data
    )


def test_a_checkpoint_behind_a_web_page_is_explained_and_offline_names_the_command(
    tmp_path, monkeypatch
):
    out = weights_get("uformer-b", {"PTGRM_WEIGHTS": str(tmp_path / "w")})
    assert out.returncode == 1 and "sharepoint" in out.stdout.lower()
    assert (
        f"put it at {tmp_path / 'w' / 'Uformer_B.pth'}" in out.stdout
        and not (tmp_path / "w").exists()
    )
    out = weights_get(
        "restormer-deblur",
        {"PTGRM_GITHUB_MIRROR": "http://127.0.0.1:9", "PTGRM_WEIGHTS": str(tmp_path)},
    )
    assert out.returncode == 1 and "offline?" in out.stderr and "Traceback" not in out.stderr
    monkeypatch.setenv("PTGRM_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"python -m pipeline weights get restormer-deblur"):
        build_network_target("restormer-deblur")  # offline, as before: refused, naming the command
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(
        WeightsNotFound, match=r"python -m pipeline weights get clip-vit-b32` .*--clip-weights"
    ):
        build_encoder("clip-vit-b32")
