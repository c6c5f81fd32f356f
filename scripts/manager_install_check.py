"""Install this pack through ComfyUI-Manager's legacy "Install via Git URL", as the README says,
into a fresh ComfyUI copy, and check that its 8 nodes load.

Everything stays on 127.0.0.1 and in one temporary folder:
1. the pack's committed HEAD is cloned bare and served with `git daemon` (git://127.0.0.1:PORT/);
2. ComfyUI (COMFYUI_PATH, or what `python -m instantid doctor` finds) is copied, without models,
   custom nodes, user data or its own tests;
3. a separate venv sees this Python's packages (a .pth line) and gets comfyui_manager from PyPI
   (by default the version ComfyUI's manager_requirements.txt pins), so this Python is untouched;
4. the Manager's config.ini gets the line the README gives for that version;
5. ComfyUI starts with --enable-manager --enable-manager-legacy-ui --listen 127.0.0.1, the script
   POSTs the git URL to /v2/customnode/install/git_url (what the legacy UI's button calls),
   restarts ComfyUI and reads /object_info.

    python scripts/manager_install_check.py [--manager-version 4.3] [--keep]

Exit code 0 when all 8 node ids are listed; the output says each step and its time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from instantid.commands.comfy_home import find_comfyui, why_not_found  # noqa: E402

NODE_IDS = ("InstantIDModelLoader", "InstantIDFaceAnalysis", "FaceKeypointsPreprocessor", "ApplyInstantID",
            "ApplyInstantIDAdvanced", "InstantIDAttentionPatch", "ApplyInstantIDControlNet", "InstantIDFaceSimilarity")
PACK_NAME = "instantid-nodes"
READY_LINE = "To see the GUI go to"
# Left out of the ComfyUI copy: the user's data and packs, and ComfyUI's own tests (top level only:
# comfy/ldm/models is code).
NOT_COPIED = {".git", "models", "custom_nodes", "user", "input", "output", "temp", "tests", "tests-unit"}


def config_line(version: str) -> str:
    """The config.ini line that allows a git-URL install from a loopback ComfyUI (README, Install)."""
    release = tuple(int(part) for part in version.split(".")[:3])
    if release >= (4, 2, 2):  # 4.2.2 moved the git-URL install from security_level to its own flag
        return "allow_git_url_install = true"
    return "security_level = normal-"


def pinned_manager_version(comfyui: Path) -> str:
    for line in (comfyui / "manager_requirements.txt").read_text().splitlines():
        if line.strip().startswith("comfyui_manager=="):
            return line.split("==", 1)[1].strip()
    raise SystemExit(f"{comfyui}/manager_requirements.txt pins no comfyui_manager version; pass --manager-version")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Steps:
    """Prints each step with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        sys.stdout.write(f"[{time.monotonic() - self.start:6.1f} s] {text}\n")
        sys.stdout.flush()


def run(command: list[str], timeout: float, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def serve_git(work: Path) -> tuple[subprocess.Popen, str]:
    """The pack's HEAD as a bare repository behind `git daemon` on 127.0.0.1."""
    repos = work / "git"
    run(["git", "clone", "--quiet", "--bare", str(REPO_ROOT), str(repos / f"{PACK_NAME}.git")], 120)
    port = free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={repos}",
                               "--listen=127.0.0.1", f"--port={port}", str(repos)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"git://127.0.0.1:{port}/{PACK_NAME}.git"
    deadline = time.monotonic() + 20
    while subprocess.run(["git", "ls-remote", url], capture_output=True, timeout=10).returncode != 0:
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise SystemExit(f"git daemon did not serve {url}")
        time.sleep(0.2)
    return daemon, url


def make_venv(work: Path, manager_version: str) -> Path:
    """A venv that sees this Python's packages and holds comfyui_manager (and only what it adds)."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], 120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).strip())
    (site / "_comfyui_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"comfyui_manager=={manager_version}"], 600)
    return python


def start_comfyui(python: Path, comfyui: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "ab") as stream:
        process = subprocess.Popen([str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                    "--disable-auto-launch", "--enable-manager", "--enable-manager-legacy-ui"],
                                   cwd=comfyui, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if log.read_text(errors="replace").count(READY_LINE) > 0:
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=5).close()
                return process, url
            except OSError:
                pass
        time.sleep(0.25)
    stop(process)
    raise SystemExit(f"ComfyUI did not get ready within 180 s:\n{log.read_text(errors='replace')[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def install_via_git_url(url: str, git_url: str) -> int:
    request = urllib.request.Request(url + "/v2/customnode/install/git_url", data=git_url.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manager-version", help="comfyui_manager version (default: the one ComfyUI pins)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--without-config-line", action="store_true",
                        help="the control: no config line, so the Manager must refuse the install (HTTP 403)")
    args = parser.parse_args()
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        os.environ.pop(name, None)  # the loopback requests must not go to a proxy
    source = find_comfyui()
    if source is None:
        raise SystemExit(why_not_found())
    version = args.manager_version or pinned_manager_version(source)
    steps = Steps()
    work = Path(tempfile.mkdtemp(prefix="instantid-manager-"))
    daemon = None
    try:
        daemon, git_url = serve_git(work)
        head = run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], 30).strip()
        steps.say(f"serving {REPO_ROOT} HEAD {head[:12]} at {git_url}")
        comfyui = work / "ComfyUI"
        shutil.copytree(source, comfyui, ignore=lambda folder, names: [
            n for n in names if n == "__pycache__" or (Path(folder) == source and n in NOT_COPIED)])
        (comfyui / "custom_nodes").mkdir()
        steps.say(f"copied ComfyUI from {source} to {comfyui}")
        python = make_venv(work, version)
        before = set(run([str(python), "-m", "pip", "list", "--format=freeze"], 120).splitlines())
        steps.say(f"venv {python.parent.parent} with comfyui_manager {version} from PyPI")
        config = comfyui / "user" / "__manager" / "config.ini"
        config.parent.mkdir(parents=True)
        config.write_text("[default]\n" + ("" if args.without_config_line else f"{config_line(version)}\n"))
        steps.say(f"{config}: [default] {'(nothing)' if args.without_config_line else config_line(version)}")
        log = work / "comfyui.log"
        process, url = start_comfyui(python, comfyui, log)
        steps.say(f"ComfyUI with the Manager (legacy UI) listening on {url}")
        status = install_via_git_url(url, git_url)
        steps.say(f"POST /v2/customnode/install/git_url {git_url}: HTTP {status}")
        stop(process)
        installed = comfyui / "custom_nodes" / PACK_NAME
        if args.without_config_line:
            refused = status == 403 and not installed.exists()
            steps.say("PASS: refused without the config line" if refused else "FAILED: installed without the config line")
            return 0 if refused else 1
        if status != 200 or not (installed / "nodes.py").is_file():
            sys.stdout.write(log.read_text(errors="replace")[-4000:])
            steps.say("FAILED: the Manager did not install the pack")
            return 1
        installed_head = run(["git", "-C", str(installed), "rev-parse", "HEAD"], 30).strip()
        steps.say(f"installed at {installed} (HEAD {installed_head[:12]}); restarting ComfyUI")
        process, url = start_comfyui(python, comfyui, log)
        try:
            import json
            with urllib.request.urlopen(url + "/object_info", timeout=60) as response:
                object_info = json.load(response)
        finally:
            stop(process)
        found = [node_id for node_id in NODE_IDS if node_id in object_info]
        ours = sorted(k for k, v in object_info.items() if PACK_NAME in str(v.get("python_module", "")))
        after = set(run([str(python), "-m", "pip", "list", "--format=freeze"], 120).splitlines())
        removed = sorted(before - after)
        steps.say(f"/object_info lists {len(found)}/{len(NODE_IDS)} node ids: {', '.join(found)}")
        steps.say(f"node ids from custom_nodes/{PACK_NAME}: {', '.join(ours)}")
        steps.say(f"packages added or changed by the install: {', '.join(sorted(after - before)) or 'none'}; "
                  f"removed or replaced: {', '.join(removed) or 'none'}")
        ok = len(found) == len(NODE_IDS) and installed_head == head
        steps.say("PASS" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=10)
        if args.keep:
            sys.stdout.write(f"kept {work}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
