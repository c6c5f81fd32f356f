"""Finding or installing ComfyUI (instantid.commands.bootstrap), and run-tests' ComfyUI step
(scripts/comfyui-for-tests): on a machine without ComfyUI it installs the tested version through
the same comfy-cli code path as `portrait`, from a local repository here, and the ComfyUI tests
then run instead of being skipped."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instantid.commands import bootstrap
from instantid.commands.comfy_home import PACK_ROOT
from support.comfy_repo import make_comfyui_repository
from support.server import TESTS, free_port

SCRIPT = PACK_ROOT / "scripts" / "comfyui-for-tests"


def bare_environment(home: Path, repository: str) -> dict[str, str]:
    """No ComfyUI anywhere: no COMFYUI_PATH, an empty HOME (so no ~/comfy/ComfyUI), the repository
    URL pointed at `repository`."""
    env = {name: value for name, value in os.environ.items() if name not in ("COMFYUI_PATH", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), INSTANTID_COMFYUI_REPO=repository)
    return env


def run_comfyui_tests(env: dict[str, str]) -> subprocess.CompletedProcess:
    """One small ComfyUI test of the suite, as run-tests would run it with this environment: it boots
    ComfyUI but writes no model (the FLUX bed would be built again in the empty HOME's cache)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_comfyui_bed.py",
                           "-k", "registered"], cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)


def test_run_tests_installs_the_tested_comfyui_when_there_is_none_and_its_tests_run(comfy, tmp_path):
    from conftest import COMFYUI
    repository = make_comfyui_repository(COMFYUI, tmp_path / "ComfyUI.git", bootstrap.COMFYUI_VERSION)
    home = tmp_path / "home"
    home.mkdir()

    offline = bare_environment(home, f"http://127.0.0.1:{free_port()}/ComfyUI.git")
    found = subprocess.run([SCRIPT, sys.executable], env=offline, capture_output=True, text=True, timeout=300)
    assert found.returncode == 1 and found.stdout == ""
    assert "step 'install ComfyUI' failed: `git ls-remote" in found.stderr
    skipped = run_comfyui_tests(offline)
    assert "ComfyUI: NOT FOUND, the ComfyUI tests will be SKIPPED" in skipped.stdout
    assert "SKIPPED 1 test: ComfyUI not found" in skipped.stdout
    assert "1 skipped" in skipped.stdout and "passed" not in skipped.stdout

    env = bare_environment(home, str(repository))
    found = subprocess.run([SCRIPT, sys.executable], env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    installed = home / ".cache" / "instantid-nodes" / "ComfyUI"
    assert found.stdout == f"{installed}\n"
    assert f"install ComfyUI {bootstrap.COMFYUI_VERSION} for" in found.stderr and "ComfyUI: already installed" in found.stderr
    assert not (installed / "custom_nodes" / bootstrap.PACK_LINK_NAME).exists()  # --no-link: tests load the pack
    ran = run_comfyui_tests(dict(env, COMFYUI_PATH=found.stdout.strip()))
    assert f"ComfyUI: {installed} (version {bootstrap.COMFYUI_VERSION}); ComfyUI tests will run" in ran.stdout
    assert "1 passed" in ran.stdout and "skipped" not in ran.stdout, ran.stdout[-2000:]

    again = subprocess.run([SCRIPT, sys.executable], env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout == f"{installed}\n" and "install ComfyUI: not needed" in again.stderr


def test_comfy_cli_is_asked_for_the_hardware_and_keeps_an_installed_torch(tmp_path):
    command = bootstrap.comfy_cli_command(tmp_path / "ws", hardware="nvidia", url="file:///r", version="0.8.0",
                                          keep_torch=True)
    assert command[1:] == ["-m", "comfy_cli", "--workspace", str(tmp_path / "ws"), "--skip-prompt", "install",
                           "--url", "file:///r", "--version", "0.8.0", "--skip-manager", "--skip-requirement",
                           "--nvidia", "--skip-torch-or-directml"]
    assert bootstrap.comfy_cli_command(tmp_path, hardware="m-series", url="u", version="0.8.0",
                                       keep_torch=False)[-1] == "--m-series"


@pytest.mark.skipif(sys.platform == "darwin", reason="Apple silicon is recognised before any GPU tool")
@pytest.mark.parametrize("tools, expected", [({"nvidia-smi": 0}, "nvidia"), ({"nvidia-smi": 9}, None),
                                             ({"rocminfo": 0}, "amd"), ({}, None)])
def test_hardware_is_detected_from_the_gpu_tools_that_answer(tmp_path, monkeypatch, tools, expected):
    for name, status in tools.items():
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\nexit {status}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    cpu_or_rocm = "amd" if Path("/dev/kfd").exists() else "cpu"
    assert bootstrap.detect_hardware() == (expected or cpu_or_rocm)


def test_missing_requirements_checks_versions_and_markers():
    lines = ["# a comment", "", "pytest>=1", "pytest<1", "no-such-package-xyz>=1", "pytest; python_version < '3'",
             "-r other.txt", "numpy>=1.0  # why"]
    assert bootstrap.missing_requirements(lines) == ["pytest<1", "no-such-package-xyz>=1"]


def test_link_pack_links_once_and_refuses_to_replace_another_copy(tmp_path):
    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    assert bootstrap.link_pack(comfyui).startswith("linked ")
    link = comfyui / "custom_nodes" / bootstrap.PACK_LINK_NAME
    assert link.resolve() == PACK_ROOT
    assert bootstrap.link_pack(comfyui) == f"already in {link}"
    link.unlink()
    link.mkdir()
    with pytest.raises(bootstrap.StepFailed, match=r"^step 'link the pack' failed: .* is another copy of the pack\. "
                                                   r"To fix: remove it"):
        bootstrap.link_pack(comfyui)


def test_a_wrong_comfyui_path_or_a_foreign_workspace_stops_with_the_step(tmp_path, monkeypatch):
    steps = bootstrap.Steps(4, stream=open(os.devnull, "w"))
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(bootstrap.StepFailed, match="^step 'find ComfyUI' failed: COMFYUI_PATH=.* is not a ComfyUI"):
        bootstrap.prepare_comfyui(steps=steps)
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    workspace = tmp_path / "busy"
    (workspace / "notes").mkdir(parents=True)
    with pytest.raises(bootstrap.StepFailed, match="^step 'install ComfyUI' failed: .*busy exists but is not a ComfyUI "
                                                   "checkout. To fix: move it away"):
        bootstrap.prepare_comfyui(workspace=workspace, hardware="cpu", link=False, steps=steps)
    assert list(workspace.iterdir()) == [workspace / "notes"]


def test_a_python_without_the_packs_packages_is_told_what_to_install_or_gets_them(tmp_path):
    """A fresh clone run with a bare Python: `doctor` says what to install; `portrait` installs the
    packages with pip (here a venv without pip, so that step fails and says so)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    doctor = subprocess.run([python, "-m", "instantid", "doctor"], cwd=PACK_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert doctor.returncode == 1
    missing = re.fullmatch(r"python -m instantid: this Python \((.+)\) lacks the package '(\w+)' that the pack needs; "
                           r"install the pack's packages: (.+)\n", doctor.stderr)
    assert missing is not None, doctor.stderr
    assert missing[1] == str(python) and missing[2] in ("numpy", "tqdm")
    assert missing[3] == (f"{python} -m pip install --disable-pip-version-check -r {PACK_ROOT / 'requirements.txt'} "
                          f"{bootstrap.COMFY_CLI_REQUIREMENT}")
    face = tmp_path / "face.png"  # a photo that passes the input check, which now runs before any install
    face.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    portrait = subprocess.run([python, "-m", "instantid", "portrait", str(face), "a portrait"], cwd=PACK_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert portrait.returncode == 1
    assert portrait.stderr.startswith(f"[1/1] install the pack's Python packages into {tmp_path / 'venv'} (it lacks ")
    assert ("python -m instantid portrait: error: step 'install the pack's Python packages' failed: `python -m pip "
            "install") in portrait.stderr and "No module named pip" in portrait.stderr
