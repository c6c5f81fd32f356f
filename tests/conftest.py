"""Shared test setup.

The repo root goes at the END of sys.path so that `import instantid` and `import resampler` work
while ComfyUI's own `nodes` module (put first at boot) wins over the pack's nodes.py.

ComfyUI tests use the `comfy` fixture: ComfyUI booted once in this process (CPU), the pack and a
test-only node pack loaded as custom nodes, and generated models (tiny SDXL-layout UNet, tiny
IdentityNet in diffusers format, an adapter with the real layout, a synthetic antelopev2) in a
temporary ComfyUI base directory (`comfy_booted` is the same ComfyUI before the models are
written, for tests that need no model). Without ComfyUI those tests are skipped, and the report
header says why in one line.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

# One torch thread in every test process and server (set before anything imports torch): the bed's
# tensors are tiny, a second thread gives no speed (measured: same wall time, 40 % more CPU time),
# and with two pytest workers or a server beside pytest on two cores, OpenMP's spinning threads make
# a sampling step many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXTURE_PACK = TESTS / "fixture_pack"
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from instantid.commands.comfy_home import comfyui_version, find_comfyui, why_not_found  # noqa: E402

COMFYUI = find_comfyui()
from support.server import ADAPTER_BIN, ADAPTER_SAFETENSORS, IDENTITYNET_NAME, UNET_NAME  # noqa: E402,F401


def pytest_report_header(config: pytest.Config) -> list[str]:
    import importlib.util
    ray = ("Ray: installed; the Ray batch tests will run" if importlib.util.find_spec("ray") else
           "Ray: NOT INSTALLED, the Ray batch tests will be SKIPPED (pip install -r requirements-test.txt)")
    if COMFYUI is None:
        return [f"ComfyUI: NOT FOUND, the ComfyUI tests will be SKIPPED. {why_not_found()}", ray]
    return [f"ComfyUI: {COMFYUI} (version {comfyui_version(COMFYUI)}); ComfyUI tests will run", ray]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per distinct skip reason (pytest's -rs would repeat it for every test location), then
    the figures the tests recorded."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"SKIPPED {count} test{'s' if count > 1 else ''}: {reason}", yellow=True, bold=True)
    # The figures tests record (record_property: parity ratios and the like), shown in every run's output.
    for report in terminalreporter.stats.get("passed", []):
        for name, value in report.user_properties:
            terminalreporter.write_line(f"FIGURE {report.nodeid.split('::')[0]} {name}: {value}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the network: insightface's downloader fails at once, and so does any socket
    connection to an address outside the loopback range."""
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else ""
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not (host.startswith("127.") or host in ("::1", "localhost")):
            raise OSError(f"tests must not use the network (attempted connection to {address})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    try:
        import insightface.utils.storage as storage
    except ImportError:
        return

    def refuse_download(*args: object, **kwargs: object) -> None:
        raise RuntimeError("insightface tried to download a model during a test")

    monkeypatch.setattr(storage, "download_file", refuse_download)


@dataclass
class ComfyBed:
    """The booted ComfyUI with the generated models in place."""
    embedded: object          # instantid.commands.embedded.EmbeddedComfyUI
    base: Path                # the ComfyUI base directory (models/, input/, output/)
    pack: ModuleType          # the pack as ComfyUI loaded it

    def pack_module(self, name: str) -> ModuleType:
        """A module of the pack as ComfyUI loaded it, e.g. 'instantid.attention'."""
        return sys.modules[f"{self.pack.__name__}.{name}"]

    def run(self, prompt: dict, reuse_outputs: bool = False):
        return self.embedded.run(prompt, reuse_outputs=reuse_outputs)


@pytest.fixture(scope="session")
def comfy_booted(tmp_path_factory: pytest.TempPathFactory) -> ComfyBed:
    """ComfyUI booted with the pack and the fixture pack, its base directory still without models:
    for the tests that only look at the registered nodes."""
    if COMFYUI is None:
        pytest.skip(why_not_found())
    from instantid.commands.embedded import EmbeddedComfyUI
    base = tmp_path_factory.mktemp("comfy-base")
    embedded = EmbeddedComfyUI.start(COMFYUI, cpu=True, base_directory=base, load_custom_nodes=False,
                                     extra_node_dirs=[REPO_ROOT, FIXTURE_PACK])
    return ComfyBed(embedded, base, sys.modules[str(REPO_ROOT).replace(".", "_x_")])


@pytest.fixture(scope="session")
def comfy(comfy_booted: ComfyBed) -> ComfyBed:
    """The booted ComfyUI with the generated models in its base directory."""
    from support.server import write_fixture_models
    write_fixture_models(comfy_booted.base)
    return comfy_booted


@pytest.fixture
def sampler_spy(monkeypatch):
    """Records the model, the conditioning and the sampled latent of each KSampler call."""
    import nodes
    seen = []
    real = nodes.common_ksampler

    def spy(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kwargs):
        seen.append({"model": model, "positive": positive, "negative": negative})
        result = real(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kwargs)
        seen[-1]["latent"] = result[0]["samples"]
        return result
    monkeypatch.setattr(nodes, "common_ksampler", spy)
    return seen
