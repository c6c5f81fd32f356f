"""fetch-models (huggingface_hub's hf_hub_download, then the pack's size and sha256 check) against a
loopback server that answers what huggingface_hub asks (HEAD/GET of /resolve/ redirecting to an LFS
location, with the Hub's metadata headers), with small generated files. Covers resume of dropped
connections, retries, checksums, timeouts, Ctrl-C, and gated files with and without a token."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from packaging.version import Version
from support.headless import finishes_within
from support.hub import FakeHub, serve_hub

from instantid.commands import cli, fetch
from instantid.model_files import CATALOG

ENTRIES = {entry.id: entry for entry in CATALOG}
@pytest.fixture
def hub():
    with serve_hub() as state:
        yield state


@pytest.fixture
def silent_endpoint():
    """A loopback port that accepts connections (the kernel completes them) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No endpoint and no token from the environment or a login, and no proxy: loopback requests
    would go to it."""
    from huggingface_hub import constants
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "http_proxy", "https_proxy", "all_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    # huggingface_hub writes (and so resumes from) whole chunks of 10 MB; the fixture files are smaller.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 10_000)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def content(hub: FakeHub, model_id: str) -> bytes:
    return hub.files[(ENTRIES[model_id].repo, ENTRIES[model_id].file)]


def run_cli(hub_or_endpoint, base: Path, *extra: str) -> int:
    endpoint = hub_or_endpoint if isinstance(hub_or_endpoint, str) else hub_or_endpoint.endpoint
    return cli.main(["fetch-models", "--base-directory", str(base), "--endpoint", endpoint, *extra])


def test_fetches_every_file_to_its_catalog_path(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's switch: its bars even off a terminal
    assert run_cli(hub, tmp_path) == 0
    expected_paths = {
        "adapter": tmp_path / "models/instantid/ip-adapter.bin",
        "identitynet": tmp_path / "models/controlnet/instantid/diffusion_pytorch_model.safetensors",
        "antelopev2-detector": tmp_path / "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx",
        "antelopev2-recognizer": tmp_path / "models/insightface/models/antelopev2/glintr100.onnx",
    }
    for model_id, path in expected_paths.items():
        assert path.read_bytes() == content(hub, model_id)
    assert files_under(tmp_path) == sorted(p.relative_to(tmp_path).as_posix() for p in expected_paths.values())
    # Metadata from HEAD requests only (no tree listing), and one GET per file.
    assert {method for method, (path, _) in zip(hub.methods, hub.requests) if not path.startswith("/lfs/")} == {"HEAD"}
    assert len(hub.file_gets()) == 4 and all("Range" not in headers for _, headers in hub.file_gets())
    out, err = capsys.readouterr()
    if Version(huggingface_hub.__version__) >= Version("0.27"):  # where TQDM_POSITION=-1 shows them
        assert "ip-adapter.bin" in err and "100%" in err  # huggingface_hub's progress bars
    assert "non-commercial research" in out and "Done: 4 downloaded, 0 already present" in out


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    entry = ENTRIES["adapter"]
    hub.ignore_range = True
    hub.drop_after[(entry.repo, entry.file)] = (100_000, "close")
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0
    assert (tmp_path / "models/instantid/ip-adapter.bin").read_bytes() == content(hub, "adapter")
    ranges = [headers.get("Range") for _, headers in hub.file_gets()]
    # huggingface_hub 1.x and 2.x start over within the try; 0.x appends the whole answer, which fails the size
    # check, and the pack's next try starts from zero.
    assert ranges[:2] == [None, "bytes=100000-"] and ranges[2:] in ([], [None])


def test_ctrl_c_mid_download_leaves_no_file_and_the_rerun_finishes(hub, tmp_path):
    """SIGINT while the body is coming: KeyboardInterrupt, no file under its final name nor a half
    one beside it (what huggingface_hub keeps stays in the staging folder); the re-run completes."""
    entry = ENTRIES["adapter"]
    hub.stall_after[(entry.repo, entry.file)] = 50_000
    final = tmp_path / "models/instantid/ip-adapter.bin"

    def interrupt_once_the_body_started() -> None:
        deadline = time.monotonic() + 10
        while not hub.file_gets() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_once_the_body_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):  # in this thread, as Ctrl-C reaches the command (a stalled read ends it too)
        fetch.fetch_models([entry], {"instantid": final.parent}, endpoint=hub.endpoint, timeout=5, retries=0)
    assert not final.exists()
    assert [name for name in files_under(final.parent) if not name.startswith(".ip-adapter.bin.download/")] == []
    del hub.stall_after[(entry.repo, entry.file)]
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0
    assert final.read_bytes() == content(hub, "adapter") and files_under(final.parent) == ["ip-adapter.bin"]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropped_connection_is_retried_and_resumed(hub, tmp_path, how):
    entry = ENTRIES["antelopev2-recognizer"]
    hub.drop_after[(entry.repo, entry.file)] = (70_000, how)
    results = fetch.fetch_models([entry], {"insightface": tmp_path}, endpoint=hub.endpoint, retries=2, retry_delay=0)
    final = tmp_path / entry.path
    assert final.read_bytes() == content(hub, entry.id)
    assert results == [fetch.FetchResult(entry, final, True, True)]
    gets = hub.file_gets()
    assert len(gets) == 2 and "Range" not in gets[0][1]
    if how == "close":  # huggingface_hub resumes a body cut short with a Range request
        assert gets[1][1]["Range"] == "bytes=70000-"
    elif "Range" in gets[1][1]:  # a reset: resumed by huggingface_hub 0.x; 1.x and 2.x leave it to the pack's retry
        assert int(gets[1][1]["Range"].removeprefix("bytes=").rstrip("-")) <= 70_000
    assert files_under(tmp_path) == [entry.path]


def test_wrong_published_sha256_installs_nothing(hub, tmp_path, capsys):
    entry = ENTRIES["antelopev2-detector"]
    hub.published_sha256[(entry.repo, entry.file)] = "0" * 64
    assert run_cli(hub, tmp_path, "--only", "antelopev2-detector") == 1
    final = tmp_path / "models/insightface" / entry.path
    err = capsys.readouterr().err
    [error_line] = [line for line in err.splitlines() if "error:" in line]
    assert str(final) in error_line and "sha256 mismatch" in error_line
    assert f"expected {'0' * 64}, got {hashlib.sha256(content(hub, entry.id)).hexdigest()}" in error_line
    assert "Traceback" not in err
    assert not final.exists() and list(final.parent.iterdir()) == []  # the staging folder went with the bad file


def test_server_that_never_answers_times_out(silent_endpoint, tmp_path, capsys):
    started = time.monotonic()
    code = finishes_within(10, run_cli, silent_endpoint, tmp_path, "--only", "adapter", "--timeout", "0.5", "--retries", "1")
    assert code == 1
    assert 0.9 < time.monotonic() - started < 6  # two tries of 0.5 s and one retry pause
    err = capsys.readouterr().err
    assert "could not read" in err and "timed out" in err and "after 2 tries" in err


def test_stalled_body_times_out_and_installs_nothing(hub, tmp_path):
    """The body stops after 50 000 bytes: each read times out, huggingface_hub resumes from there with
    Range requests (five times, a second apart) and gives up; no file appears under its final name."""
    entry = ENTRIES["adapter"]
    hub.stall_after[(entry.repo, entry.file)] = 50_000
    started = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"ip-adapter.bin: download failed after 1 try \(.*\); check the network"):
        finishes_within(30, fetch.fetch_models, [entry], {"instantid": tmp_path}, endpoint=hub.endpoint,
                        timeout=0.5, retries=0, retry_delay=0)
    assert time.monotonic() - started < 20
    assert not (tmp_path / "ip-adapter.bin").exists()
    assert [name for name in files_under(tmp_path) if not name.startswith(".ip-adapter.bin.download/")] == []
    ranges = [headers.get("Range") for _, headers in hub.file_gets()]
    assert ranges[0] is None and len(ranges) > 1 and set(ranges[1:]) == {"bytes=50000-"}


def test_present_verified_file_is_skipped_and_a_wrong_one_replaced(hub, tmp_path, capsys):
    good = tmp_path / "models/insightface/models/antelopev2/glintr100.onnx"
    good.parent.mkdir(parents=True)
    good.write_bytes(content(hub, "antelopev2-recognizer"))
    bad = good.with_name("scrfd_10g_bnkps.onnx")
    bad.write_bytes(b"x" * len(content(hub, "antelopev2-detector")))  # right size, wrong bytes
    assert run_cli(hub, tmp_path, "--only", "antelopev2-recognizer", "--only", "antelopev2-detector") == 0
    assert [path for path, _ in hub.file_gets()] == ["/lfs/DIAMONIK7777/antelopev2/scrfd_10g_bnkps.onnx"]
    assert bad.read_bytes() == content(hub, "antelopev2-detector")
    assert "Done: 1 downloaded, 1 already present" in capsys.readouterr().out


def test_file_without_published_sha256_is_checked_by_size_and_says_so(hub, tmp_path, caplog):
    config = dataclasses.replace(ENTRIES["identitynet"], id="identitynet-config", path="instantid/config.json",
                                 file="ControlNetModel/config.json")
    with caplog.at_level(logging.WARNING, logger="instantid"):
        [result] = fetch.fetch_models([config], {"controlnet": tmp_path}, endpoint=hub.endpoint)
    assert result.downloaded and not result.sha256_checked
    assert (tmp_path / "instantid/config.json").read_bytes() == hub.files[("InstantX/InstantID", "ControlNetModel/config.json")]
    assert "publishes no sha256" in caplog.text


def test_hf_endpoint_environment_variable_is_used(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert cli.main(["fetch-models", "--base-directory", str(tmp_path), "--only", "antelopev2-detector"]) == 0
    assert (tmp_path / "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx").is_file()


def test_extra_model_paths_config_picks_the_first_registered_folder(hub, tmp_path):
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "mine:\n"
        "  base_path: storage\n"
        "  controlnet: |\n    cn/first\n    cn/second\n"
        "  insightface: faces\n"
        "other:\n"
        "  base_path: elsewhere\n"
        "  insightface: faces-default\n"
        "  is_default: true\n"
        "empty:\n"
    )
    base = tmp_path / "comfy"
    base.mkdir()
    args = ["--extra-model-paths-config", str(config), "--only", "identitynet", "--only", "antelopev2-detector",
            "--only", "adapter"]
    assert run_cli(hub, base, *args) == 0
    assert (tmp_path / "storage/cn/first/instantid/diffusion_pytorch_model.safetensors").is_file()
    # is_default puts a folder first, as ComfyUI's add_model_folder_path does.
    assert (tmp_path / "elsewhere/faces-default/models/antelopev2/scrfd_10g_bnkps.onnx").is_file()
    assert (base / "models/instantid/ip-adapter.bin").is_file()  # no yaml entry: the base directory


def test_extra_model_paths_parsing_matches_comfyui(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELS_HOME", str(tmp_path / "env-home"))
    config = tmp_path / "conf" / "extra.yaml"
    config.parent.mkdir()
    config.write_text(
        "a:\n  base_path: $MODELS_HOME\n  instantid: x\n"
        "b:\n  instantid: |\n    rel/y\n    /abs/z\n"
        "c:\n  base_path: ../up\n  controlnet: ./cn/../cn2\n"
    )
    assert cli.read_extra_model_paths(config) == {
        "instantid": [tmp_path / "env-home/x", tmp_path / "conf/rel/y", Path("/abs/z")],
        "controlnet": [tmp_path / "up/cn2"],
    }


def test_no_comfyui_and_no_base_directory_fails_with_the_search_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "not-comfyui"))
    assert cli.main(["fetch-models", "--endpoint", "http://127.0.0.1:9"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "ComfyUI not found" in line and "not-comfyui" in line and "--base-directory" in line


def test_file_missing_at_the_source_is_a_clear_error(hub, tmp_path, capsys):
    del hub.files[("InstantX/InstantID", "ip-adapter.bin")]
    assert run_cli(hub, tmp_path, "--only", "adapter") == 1
    err = capsys.readouterr().err
    assert "ip-adapter.bin is not in InstantX/InstantID at revision main" in err and "Traceback" not in err


def test_a_gated_file_is_fetched_with_a_token_and_refused_without_one(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    entry = ENTRIES["adapter"]
    hub.gated[entry.repo] = "hf_fixture_token"
    final = tmp_path / "models/instantid/ip-adapter.bin"
    assert run_cli(hub, tmp_path, "--only", "adapter") == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m instantid fetch-models: error: InstantX/InstantID/ip-adapter.bin: ")
    assert f"accept its licence on {hub.endpoint}/{entry.repo}, then set HF_TOKEN or run `hf auth login`" in line
    assert files_under(tmp_path) == [] and all("Authorization" not in headers for _, headers in hub.requests)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    assert run_cli(hub, tmp_path, "--only", "adapter") == 1 and not final.exists()
    monkeypatch.setenv("HF_TOKEN", "hf_fixture_token")
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0
    assert final.read_bytes() == content(hub, "adapter")
    assert hub.file_gets()[-1][1]["Authorization"] == "Bearer hf_fixture_token"

    # The token `hf auth login` saved serves as well.
    monkeypatch.delenv("HF_TOKEN")
    final.unlink()
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_fixture_token")
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0 and final.read_bytes() == content(hub, "adapter")


@pytest.mark.parametrize("args, message", [
    (["fetch-models", "--only", "nope"], "invalid choice: 'nope'"),
    (["fetch-models", "--timeout", "0"], "must be more than 0"),
    (["fetch-models", "--endpoint", "ftp://x", "--base-directory", "."], "not an http(s) URL"),
    (["fetch-models", "--base-directory", "/nonexistent/comfy"], "is not a directory"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    """`python -m instantid` runs the CLI and turns an expected error into one line and exit 1."""
    done = subprocess.run([sys.executable, "-m", "instantid", "fetch-models", "--base-directory", str(tmp_path / "nope")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"python -m instantid fetch-models: error: --base-directory {tmp_path / 'nope'} is not a directory\n"
