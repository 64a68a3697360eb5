"""Real servers on 127.0.0.1 for tests: an MLflow tracking server and an S3 API (moto's standalone server).

Each runs as its own process in a session of its own and is stopped through its pid. An `MlflowServer`
can be stopped and started again on the same port and store, as a server that goes away mid-sweep would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited at start:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    _stop(process)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s:\n{log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


class MlflowServer:
    """`mlflow server` with a sqlite store and local artifacts under `root`, one worker, on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)

    def start(self) -> MlflowServer:
        log = self.root / "server.log"
        with log.open("a") as output:
            self.process = self._popen(output)
        _wait_until_up(f"{self.url}/health", self.process, log)
        return self

    def _popen(self, output) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


class S3Server:
    """moto's S3 API on loopback, with one bucket; `env` points pyarrow, boto3 and Ray's workers at it."""

    def __init__(self, root: Path, bucket: str = "raylora-test") -> None:
        self.root = root
        self.bucket = bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "raylora-test-key-id",
            "AWS_SECRET_ACCESS_KEY": "raylora-test-secret-access-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        log = self.root / "moto.log"
        with log.open("a") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_until_up(f"{self.url}/moto-api/", self.process, log)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


class LosingProxy:
    """An HTTP proxy in front of a server that loses the answer to chosen requests, as a flaky network does.

    Each request goes to the server; when `lose(method, path, body)` says so (once per matching request
    until `losses` run out), the server's answer is read and thrown away and the client's connection
    closed without one: the server did the work, the client never heard. When the server does not answer,
    the client's connection is closed the same way.
    """

    def __init__(self, upstream_port: int, lose, losses: int = 1) -> None:
        import http.server
        import threading

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lost: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    upstream.close()
                except OSError:
                    self._hang_up()
                    return
                if len(proxy.lost) < losses and lose(self.command, self.path, body):
                    proxy.lost.append(f"{self.command} {self.path}")
                    self._hang_up()
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in (
                        "transfer-encoding",
                        "connection",
                        "content-length",
                        "date",
                        "server",
                    ):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _hang_up(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
