"""fetch-models against a loopback server that speaks the two Hugging Face endpoints the
downloader uses (tree API with LFS metadata, /resolve/ redirecting to an LFS host), with small
generated files. Covers resume, retries after dropped connections, checksums and timeouts."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instantid.commands import cli, fetch
from instantid.commands.catalog import CATALOG
from support.headless import finishes_within
from support.hub import FakeHub, serve_hub

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
def clean_environment(monkeypatch):
    """No endpoint from the environment, and no proxy: urllib would send loopback requests to it."""
    for name in ("HF_ENDPOINT", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def content(hub: FakeHub, model_id: str) -> bytes:
    return hub.files[(ENTRIES[model_id].repo, ENTRIES[model_id].file)]


def run_cli(hub_or_endpoint, base: Path, *extra: str) -> int:
    endpoint = hub_or_endpoint if isinstance(hub_or_endpoint, str) else hub_or_endpoint.endpoint
    return cli.main(["fetch-models", "--base-directory", str(base), "--endpoint", endpoint, *extra])


def test_fetches_every_file_to_its_catalog_path(hub, tmp_path, capsys):
    assert run_cli(hub, tmp_path) == 0
    expected_paths = {
        "adapter": tmp_path / "models/instantid/ip-adapter.bin",
        "identitynet": tmp_path / "models/controlnet/instantid/diffusion_pytorch_model.safetensors",
        "antelopev2-detector": tmp_path / "models/insightface/models/antelopev2/scrfd_10g_bnkps.onnx",
        "antelopev2-recognizer": tmp_path / "models/insightface/models/antelopev2/glintr100.onnx",
    }
    for model_id, path in expected_paths.items():
        assert path.read_bytes() == content(hub, model_id)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(tmp_path).as_posix() for p in expected_paths.values())
    # One listing per folder (InstantID root, ControlNetModel/, antelopev2 root) and one GET per file.
    trees = sorted(path for path, _ in hub.requests if path.startswith("/api/"))
    assert trees == ["/api/models/DIAMONIK7777/antelopev2/tree/main", "/api/models/InstantX/InstantID/tree/main",
                     "/api/models/InstantX/InstantID/tree/main/ControlNetModel"]
    assert len(hub.file_gets()) == 4 and all("Range" not in headers for _, headers in hub.file_gets())
    out, err = capsys.readouterr()
    assert "ip-adapter.bin" in err and "100%" in err  # the tqdm progress bars
    assert "non-commercial research" in out and "Done: 4 downloaded, 0 already present" in out


def test_resumes_a_partial_download_with_a_range_request(hub, tmp_path):
    full = content(hub, "adapter")
    final = tmp_path / "models/instantid/ip-adapter.bin"
    final.parent.mkdir(parents=True)
    part = final.with_name("ip-adapter.bin.part")
    half = len(full) // 2
    part.write_bytes(full[:half])
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0
    assert final.read_bytes() == full and not part.exists()
    [(path, headers)] = hub.file_gets()
    assert path == "/lfs/InstantX/InstantID/ip-adapter.bin"
    assert headers["Range"] == f"bytes={half}-"


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    hub.ignore_range = True
    final = tmp_path / "models/instantid/ip-adapter.bin"
    final.parent.mkdir(parents=True)
    final.with_name("ip-adapter.bin.part").write_bytes(b"stale bytes that must not survive" * 100)
    assert run_cli(hub, tmp_path, "--only", "adapter") == 0
    assert final.read_bytes() == content(hub, "adapter")
    assert hub.file_gets()[0][1]["Range"] == "bytes=3300-"


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
    resumed_at = int(gets[1][1]["Range"].removeprefix("bytes=").rstrip("-"))
    # An RST can discard bytes the client had not read yet; it resumes from what it wrote.
    assert (0 < resumed_at <= 70_000) if how == "reset" else resumed_at == 70_000
    assert not final.with_name(final.name + ".part").exists()


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
    assert not final.exists() and not final.with_name(final.name + ".part").exists()
    assert list(final.parent.iterdir()) == []


def test_server_that_never_answers_times_out(silent_endpoint, tmp_path, capsys):
    started = time.monotonic()
    code = finishes_within(10, run_cli, silent_endpoint, tmp_path, "--only", "adapter", "--timeout", "0.5", "--retries", "1")
    assert code == 1
    assert 0.9 < time.monotonic() - started < 6  # two tries of 0.5 s and one retry pause
    err = capsys.readouterr().err
    assert "could not read" in err and "timed out" in err and "after 2 tries" in err


def test_stalled_body_times_out_and_keeps_the_partial_file(hub, tmp_path):
    entry = ENTRIES["adapter"]
    hub.stall_after[(entry.repo, entry.file)] = 50_000
    started = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"ip-adapter.bin: download failed 2 times in a row .*timed out"):
        finishes_within(8, fetch.fetch_models, [entry], {"instantid": tmp_path}, endpoint=hub.endpoint,
                        timeout=0.5, retries=1, retry_delay=0)
    assert time.monotonic() - started < 6
    # The first try kept 50 000 bytes (progress, so it does not count); then two tries in a row
    # asked for the rest and got nothing.
    assert (tmp_path / "ip-adapter.bin.part").stat().st_size == 50_000
    assert not (tmp_path / "ip-adapter.bin").exists()
    assert [h.get("Range") for _, h in hub.file_gets()] == [None, "bytes=50000-", "bytes=50000-"]


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
    assert "ip-adapter.bin is not listed in InstantX/InstantID" in err and "Traceback" not in err


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
