"""Fixtures for `python -m instantid run`: a small API-format workflow for the test bed, and fake
ComfyUI HTTP servers on 127.0.0.1 (one that answers like ComfyUI and records what it got, one
that accepts connections and never answers)."""
from __future__ import annotations

import io
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

SIMILARITY_NODE_ID = "11"


def bed_workflow(unet_name: str, reference: str, photo: str, size: int = 64, steps: int = 1) -> dict:
    """API format: the tiny checkpoint sampled to one saved image, plus a face similarity between
    two loaded photos (the tiny UNet draws no face, so it cannot be scored)."""
    def node(kind: str, title: str | None = None, **inputs: Any) -> dict:
        return {"class_type": kind, "inputs": inputs, "_meta": {"title": title or kind}}

    return {
        "1": node("TestBedTinyCheckpoint", unet_name=unet_name),
        "2": node("CLIPTextEncode", "Positive", text="a photo of a person", clip=["1", 1]),
        "3": node("CLIPTextEncode", "Negative", text="blurry", clip=["1", 1]),
        "4": node("EmptyLatentImage", width=size, height=size, batch_size=1),
        "5": node("KSampler", seed=1, steps=steps, cfg=2.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                  model=["1", 0], positive=["2", 0], negative=["3", 0], latent_image=["4", 0]),
        "6": node("VAEDecode", samples=["5", 0], vae=["1", 2]),
        "7": node("SaveImage", images=["6", 0], filename_prefix="instantid_cli"),
        "8": node("InstantIDFaceAnalysis", provider="CPU"),
        "9": node("LoadImage", "Reference", image=reference),
        "10": node("LoadImage", "Photo", image=photo),
        SIMILARITY_NODE_ID: node("InstantIDFaceSimilarity", faceanalysis=["8", 0], reference=["9", 0], image=["10", 0]),
    }


def png_bytes(width: int = 8, height: int = 6, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeComfyUI:
    """What the fake server answers and what it was sent. `history_after` polls of /history
    answer {} (queued) before the finished entry; None means it never finishes."""

    def __init__(self, outputs: dict | None = None, object_info: dict | None = None) -> None:
        self.prompt_id = "4b7c1a6e-0000-4000-8000-000000000001"
        self.outputs = outputs or {}
        self.object_info = object_info or {}
        self.images: dict[str, bytes] = {}
        self.history_after: int | None = 1
        self.status: dict = {"status_str": "success", "completed": True, "messages": []}
        self.refusal: dict | None = None  # a 400 body for POST /prompt
        self.running: list[str] = []  # a queued prompt runs until an interrupt takes it off
        self.lost_interrupts = 0  # interrupts dropped, as ComfyUI drops one that lands as a prompt starts
        self.posted: list[dict] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def history_polls(self) -> int:
        return sum(path.startswith("/history/") for path in self.requests)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, value: Any) -> None:
        self._send(code, json.dumps(value).encode())

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests.append(self.path)
            fake.posted.append(body)
        if self.path in ("/queue", "/interrupt"):  # ComfyUI answers both with an empty 200
            with fake.lock:
                if self.path == "/interrupt" and body.get("prompt_id") in fake.running:
                    if fake.lost_interrupts:
                        fake.lost_interrupts -= 1
                    else:
                        fake.running.remove(body["prompt_id"])
            return self._send(200, b"", "text/plain")
        if self.path != "/prompt":
            return self._json(404, {"error": "not found"})
        if fake.refusal is not None:
            return self._json(400, fake.refusal)
        with fake.lock:
            fake.running.append(fake.prompt_id)
        self._json(200, {"prompt_id": fake.prompt_id, "number": 0, "node_errors": {}})

    def do_GET(self) -> None:
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        with fake.lock:
            fake.requests.append(self.path)
            polls = fake.history_polls()
        if url.path == "/object_info":
            return self._json(200, fake.object_info)
        if url.path == "/queue":
            return self._json(200, {"queue_running": [[0, prompt_id, {}, {}, []] for prompt_id in fake.running],
                                    "queue_pending": []})
        if url.path == f"/history/{fake.prompt_id}":
            if fake.history_after is None or polls <= fake.history_after:
                return self._json(200, {})
            return self._json(200, {fake.prompt_id: {"prompt": [0, fake.prompt_id, {}, {}, []],
                                                      "outputs": fake.outputs, "status": fake.status}})
        if url.path == "/view":
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            if query.get("filename") in fake.images:
                return self._send(200, fake.images[query["filename"]], "image/png")
        self._json(404, {"error": "not found"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeComfyUI


@contextmanager
def serve(fake: FakeComfyUI) -> Iterator[str]:
    """Run the fake ComfyUI on a free loopback port; yields its URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections (the kernel completes them) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def finishes_within(seconds: float, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `function` in a thread so a missing timeout fails the test instead of hanging it."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the test thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a request has no timeout"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
