"""The test bed's models on disk and ComfyUI's real HTTP server over them (a subprocess on
127.0.0.1), for the tests that need what only a server gives: the web UI in a browser, the upload
and queue API, several servers at once."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS.parent
FIXTURE_PACK = TESTS / "fixture_pack"
UNET_NAME = "tiny_sdxl.safetensors"
IDENTITYNET_NAME = "instantid/diffusion_pytorch_model.safetensors"  # the path the shared workflows use
ADAPTER_BIN = "ip-adapter.bin"
ADAPTER_SAFETENSORS = "ip-adapter.safetensors"
READY_LINE = "To see the GUI go to"


def write_fixture_models(base: Path) -> Path:
    """The generated models under base/models in ComfyUI's folder layout: tiny SDXL-layout UNet,
    tiny IdentityNet (diffusers keys), the adapter (.bin and fp16 .safetensors), synthetic antelopev2;
    the FLUX bed: FLUX model and InfuseNet (linked from this machine's cache), InfiniteYou's projection
    and IR-SE50 files."""
    import torch

    from instantid.sdxl import attn2_widths
    from support.antelope import write_antelopev2
    from support.flux_bed import link_flux_models
    from support.infiniteyou_models import write_infiniteyou_files
    from support.tiny_models import (adapter_state, build_tiny_unet, write_adapter_bin, write_adapter_safetensors,
                                     write_tiny_identitynet, write_tiny_unet)
    models = base / "models"
    write_tiny_unet(models / "diffusion_models" / UNET_NAME)
    write_tiny_identitynet(models / "controlnet" / IDENTITYNET_NAME)
    state = adapter_state(attn2_widths(build_tiny_unet().model.diffusion_model))
    write_adapter_bin(models / "instantid" / ADAPTER_BIN, state)
    write_adapter_safetensors(models / "instantid" / ADAPTER_SAFETENSORS,
                              {section: {k: v.to(torch.float16) for k, v in part.items()} for section, part in state.items()})
    write_antelopev2(models / "insightface" / "models" / "antelopev2")
    link_flux_models(models)
    write_infiniteyou_files(models / "infiniteyou")
    (base / "input").mkdir(exist_ok=True)
    return models


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ComfyServer:
    """A running ComfyUI server: its URL, base directory, process and log file."""
    url: str
    base: Path
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


SERVER_PYTHONPATH = os.pathsep.join([str(TESTS), str(REPO_ROOT)])  # the fixture pack imports `support`


def link_custom_nodes(base: Path) -> None:
    """This pack and the test fixture pack in base/custom_nodes, as a user's ComfyUI has the pack."""
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for source, name in ((REPO_ROOT, "instantid-nodes"), (FIXTURE_PACK, "test-bed-nodes")):
        link = nodes_dir / name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)


def start_server(comfyui: Path, base: Path, *, port: int | None = None, timeout: float = 180.0,
                 extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start `main.py --cpu` on 127.0.0.1 with `base` as its base directory, this pack and the test
    fixture pack linked into base/custom_nodes. Returns once the server says it is ready; raises
    with the log's tail when it exits or does not get ready within `timeout` seconds."""
    link_custom_nodes(base)
    port = port or free_port()
    log_path = Path(tempfile.mkstemp(prefix="comfyui-server-", suffix=".log")[1])
    # One torch thread: the bed's models are tiny, and two servers beside pytest on two cores would
    # spin against each other. No API nodes: the tests use none, and they cost every start.
    env = dict(os.environ, PYTHONPATH=SERVER_PYTHONPATH, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                    "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
                                    *extra_args],
                                   cwd=comfyui, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode} before it was ready:\n{server.log()[-4000:]}")
        if READY_LINE in server.log():
            try:
                urllib.request.urlopen(server.url + "/system_stats", timeout=5).close()
                return server
            except OSError:
                pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"ComfyUI did not get ready within {timeout:.0f} s:\n{server.log()[-4000:]}")


@contextmanager
def comfyui_server(comfyui: Path, base: Path, **kwargs) -> Iterator[ComfyServer]:
    server = start_server(comfyui, base, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def copy_models(source_base: Path, target_base: Path) -> None:
    """Another base directory with the same models (symlinked: nothing is copied)."""
    target = target_base / "models"
    target.mkdir(parents=True, exist_ok=True)
    for entry in (source_base / "models").iterdir():
        if not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (target_base / "input").mkdir(exist_ok=True)
    shutil.copytree(source_base / "input", target_base / "input", dirs_exist_ok=True)
