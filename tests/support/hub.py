"""A loopback server that speaks the two Hugging Face endpoints the downloader uses (tree API with
LFS metadata, /resolve/ redirecting to an LFS host), with small generated files per catalog entry,
and misbehaviours on demand (dropped connections, stalls, ignored Range, wrong checksums)."""
from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from instantid.commands.catalog import CATALOG

FIXTURE_SIZES = {"sdxl-base-1.0": 90_000, "adapter": 300_000, "identitynet": 420_000, "antelopev2-detector": 60_000, "antelopev2-recognizer": 200_000,
                 # The FLUX entries (optional): small stand-ins, fetched only with --only.
                 "infusenet-aes-fp8": 11_000, "infusenet-aes-bf16": 12_000, "infusenet-sim-fp8": 13_000,
                 "infusenet-sim-bf16": 14_000, "infiniteyou-projection-aes": 15_000,
                 "infiniteyou-projection-sim": 16_000, "irse50": 17_000, "flux1-dev-fp8": 18_000}


class FakeHub:
    """State shared with the request handler: the files, what was asked, and misbehaviours."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.files = {(e.repo, e.file): rng.bytes(FIXTURE_SIZES[e.id]) for e in CATALOG}
        # A small non-LFS file beside the IdentityNet, as in the real repository.
        self.files[("InstantX/InstantID", "ControlNetModel/config.json")] = b'{"_class_name": "ControlNetModel"}'
        self.published_sha256: dict[tuple[str, str], str] = {}
        self.not_lfs: set[tuple[str, str]] = {("InstantX/InstantID", "ControlNetModel/config.json")}
        self.drop_after: dict[tuple[str, str], tuple[int, str]] = {}  # first GET only: (bytes, "close"|"reset")
        self.stall_after: dict[tuple[str, str], int] = {}  # every GET: send up to this offset, then go silent
        self.ignore_range = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()

    def file_gets(self) -> list[tuple[str, dict[str, str]]]:
        return [(path, headers) for path, headers in self.requests if path.startswith("/lfs/")]

    def listing(self, repo: str, folder: str) -> list[dict]:
        entries = []
        for (file_repo, path), content in self.files.items():
            if file_repo != repo or path.rpartition("/")[0] != folder:
                continue
            entry = {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            if (repo, path) not in self.not_lfs:
                sha = self.published_sha256.get((repo, path), hashlib.sha256(content).hexdigest())
                entry["lfs"] = {"oid": sha, "size": len(content), "pointerSize": 134}
            entries.append(entry)
        return entries


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        hub = self.server.hub
        with hub.lock:
            hub.requests.append((self.path, dict(self.headers)))
            attempt = sum(path == self.path for path, _ in hub.requests)
        if self.path.startswith("/api/models/") and "/tree/main" in self.path:
            repo, _, folder = self.path[len("/api/models/"):].partition("/tree/main")
            return self._send(200, json.dumps(hub.listing(repo, folder.strip("/"))).encode(), "application/json")
        if "/resolve/main/" in self.path:
            repo, _, file = self.path.lstrip("/").partition("/resolve/main/")
            if (repo, file) not in hub.files:
                return self._send(404, b"not found", "text/plain")
            # Like huggingface.co: LFS files are served from another location after a redirect.
            self.send_response(302)
            self.send_header("Location", f"/lfs/{repo}/{file}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if self.path.startswith("/lfs/"):
            repo_and_file = self.path[len("/lfs/"):]
            owner, name, file = repo_and_file.split("/", 2)
            return self._send_file((f"{owner}/{name}", file), attempt)
        return self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, key: tuple[str, str], attempt: int) -> None:
        hub = self.server.hub
        content = hub.files[key]
        start = 0
        requested = self.headers.get("Range")
        if requested and not hub.ignore_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        body = content[start:]
        if key in hub.stall_after:
            self.wfile.write(body[: max(0, hub.stall_after[key] - start)])
            hub.release.wait(10)  # the client must give up long before this
            return
        if key in hub.drop_after and attempt == 1:
            sent, how = hub.drop_after[key]
            self.wfile.write(body[:sent])
            if how == "reset":  # RST instead of FIN: the client sees ConnectionResetError mid-body
                time.sleep(0.3)  # let the client take the bytes first: an RST discards unread ones
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.hub = hub

    def handle_error(self, request: object, client_address: object) -> None:  # dropped sockets on purpose
        pass


@contextmanager
def serve_hub() -> Iterator[FakeHub]:
    """A FakeHub on 127.0.0.1; its URL is `hub.endpoint`."""
    state = FakeHub()
    server = HubServer(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
