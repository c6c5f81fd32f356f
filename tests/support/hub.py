"""A loopback server that answers what huggingface_hub asks for a download: HEAD and GET of
/{repo}/resolve/main/{file}, redirected to an LFS location, with the Hub's headers (X-Repo-Commit,
ETag, X-Linked-Size, X-Linked-Etag: the sha256 of an LFS file), Range requests, gated repositories
(401 GatedRepo without the right token) and missing files (404 EntryNotFound). Small generated files
per catalog entry, and misbehaviours on demand (dropped connections, stalls, ignored Range, wrong
checksums)."""
from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from instantid.model_files import CATALOG

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
        self.gated: dict[str, str] = {}  # repository -> the token that may read it
        self.commit = hashlib.sha1(b"fixture commit").hexdigest()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.methods: list[str] = []  # the HTTP method of each of self.requests
        self.lock = threading.Lock()
        self.release = threading.Event()

    def file_gets(self) -> list[tuple[str, dict[str, str]]]:
        return [(path, headers) for (path, headers), method in zip(self.requests, self.methods)
                if method == "GET" and path.startswith("/lfs/")]

    def metadata(self, key: tuple[str, str]) -> dict[str, str]:
        """The Hub's headers for a file: an LFS file's ETag is its sha256 (X-Linked-Etag), another's the git blob id."""
        content = self.files[key]
        blob = '"' + hashlib.sha1(content).hexdigest() + '"'
        headers = {"X-Repo-Commit": self.commit, "ETag": blob}
        if key not in self.not_lfs:
            sha = self.published_sha256.get(key, hashlib.sha256(content).hexdigest())
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(content))})
        return headers


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        hub = self.server.hub
        with hub.lock:
            hub.requests.append((self.path, {name.title(): value for name, value in self.headers.items()}))
            hub.methods.append(self.command)
            attempt = sum(path == self.path and method == "GET" for (path, _), method in zip(hub.requests, hub.methods))
        if "/resolve/main/" in self.path:
            repo, _, file = self.path.lstrip("/").partition("/resolve/main/")
            return self._redirect((repo, urllib.parse.unquote(file)))
        if self.path.startswith("/lfs/"):
            owner, name, file = self.path[len("/lfs/"):].split("/", 2)
            key = (f"{owner}/{name}", urllib.parse.unquote(file))
            if key not in hub.files or not self._allowed(key[0]):
                return self._send(404, b"not found", "text/plain")
            return self._send_file(key, attempt, head)
        return self._send(404, b"not found", "text/plain")

    def _allowed(self, repo: str) -> bool:
        token = self.server.hub.gated.get(repo)
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _redirect(self, key: tuple[str, str]) -> None:
        hub = self.server.hub
        if not self._allowed(key[0]):
            return self._send(401, b"gated", "text/plain", {"X-Error-Code": "GatedRepo", "X-Error-Message":
                              f"Access to model {key[0]} is restricted. You must have access to it and be authenticated."})
        if key not in hub.files:
            return self._send(404, b"not found", "text/plain", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.commit})
        # Like huggingface.co: LFS files are served from another location after a redirect.
        self.send_response(302)
        self.send_header("Location", f"/lfs/{key[0]}/{urllib.parse.quote(key[1])}")
        for name, value in hub.metadata(key).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, key: tuple[str, str], attempt: int, head: bool) -> None:
        hub = self.server.hub
        content = hub.files[key]
        start = 0
        requested = self.headers.get("Range")
        if requested and not hub.ignore_range and not head:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            self.send_response(200)
        for name, value in hub.metadata(key).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        if head:
            return
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
