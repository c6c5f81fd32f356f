"""From a clone to a working ComfyUI: find one, or install the tested version with comfy-cli for
the hardware this machine has, link this checkout into its custom_nodes, and install the Python
packages ComfyUI and the pack need into this interpreter (the one that runs ComfyUI embedded).
Every step is skipped when already done. Every subprocess has a timeout, and git is told to give
up on a stalled transfer, so nothing hangs."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import TextIO

from .comfy_home import PACK_ROOT, comfyui_version, default_workspace, find_comfyui, is_comfyui
from .errors import CommandError

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.8.0"  # the version the test suite runs against
COMFYUI_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI"
REPOSITORY_VARIABLE = "INSTANTID_COMFYUI_REPO"  # a mirror, a fork or a local clone (how the tests run offline)
PACK_LINK_NAME = "instantid-nodes"
COMFY_CLI_REQUIREMENT = "comfy-cli==1.23.0"  # the version whose `install` options this module passes
SETUP_COMMANDS = ("portrait", "install-comfyui")  # the commands that may install into this Python
_RESTARTED = "INSTANTID_PACKAGES_INSTALLED"
HARDWARE = ("nvidia", "amd", "m-series", "cpu")
REACH_TIMEOUT = 60.0  # seconds for `git ls-remote`
INSTALL_TIMEOUT = 3600.0  # comfy-cli: clone plus, without torch, a torch download of a few GB
PIP_TIMEOUT = 1800.0
PROBE_TIMEOUT = 15.0
# Installed by the torch step (or kept as the user has them); pip must never swap them behind its back.
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


class StepFailed(CommandError):
    """A step that could not be done: what it was, why, and the command that fixes it."""

    def __init__(self, step: str, cause: str, fix: str) -> None:
        cause = "; ".join(line.strip() for line in cause.strip().splitlines() if line.strip()).rstrip(".")
        super().__init__(f"step '{step}' failed: {cause}" + (f". To fix: {fix}" if fix else ""))
        self.step, self.cause, self.fix = step, cause, fix


class Steps:
    """Numbered progress lines ('[2/5] install ComfyUI ...: done') on a text stream."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.number = 0
        self.stream = stream

    def start(self, what: str) -> None:
        self.number += 1
        self.say(f"[{self.number}/{self.total}] {what}")

    def say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()


def detect_hardware() -> str:
    """comfy-cli's name for this machine's accelerator: m-series (Apple silicon), nvidia (a working
    nvidia-smi), amd (ROCm's /dev/kfd or rocminfo), else cpu."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "m-series"
    if _answers("nvidia-smi", "-L"):
        return "nvidia"
    if Path("/dev/kfd").exists() or _answers("rocminfo"):
        return "amd"
    return "cpu"


def torch_accelerator() -> str | None:
    """The GPU torch in this Python computes on ('CUDA 12.8: NVIDIA H200', 'ROCm 6.2: ...', 'Apple
    MPS', 'Intel XPU'), or None when it has only the CPU. Imports torch (detect_hardware is the
    probe for before torch is installed)."""
    import torch

    if torch.cuda.is_available():
        build = f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else f"CUDA {torch.version.cuda}"
        return f"{build}: {torch.cuda.get_device_name(0)}"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "Apple MPS"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "Intel XPU"
    return None


def _answers(program: str, *args: str) -> bool:
    found = shutil.which(program)
    if found is None:
        return False
    try:
        return subprocess.run([found, *args], capture_output=True, timeout=PROBE_TIMEOUT).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _git_environment() -> dict[str, str]:
    """No credential prompt (a wrong URL must fail, not wait for input), stalled transfers abort,
    no telemetry from comfy-cli, and comfy-cli installs into this interpreter's environment."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_HTTP_LOW_SPEED_LIMIT="1000", GIT_HTTP_LOW_SPEED_TIME="60",
               DO_NOT_TRACK="1")
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def _run(step: str, command: list[str], timeout: float, fix: str, *, quiet: bool = False) -> str:
    """Run a command whose output goes to stderr (or is kept, when quiet); StepFailed on error."""
    shown = shlex.join([Path(command[0]).name, *command[1:8]]) + (" ..." if len(command) > 8 else "")
    try:
        done = subprocess.run(command, env=_git_environment(), timeout=timeout, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE if quiet else 2, stderr=subprocess.PIPE if quiet else None,
                              text=True)
    except FileNotFoundError:
        raise StepFailed(step, f"{command[0]} is not installed", f"install {Path(command[0]).name} and run again") from None
    except subprocess.TimeoutExpired:
        raise StepFailed(step, f"`{shown}` did not finish within {timeout:.0f} s",
                         f"check the network, then run again; {fix}") from None
    if done.returncode != 0:
        detail = (done.stderr or "").strip().splitlines()[-1:] if quiet else ["see its output above"]
        raise StepFailed(step, f"`{shown}` exited with {done.returncode} ({' '.join(detail)})", fix)
    return done.stdout or ""


def check_repository(step: str, url: str, version: str) -> None:
    """Fail in seconds, naming the URL, when the repository or its tag cannot be reached."""
    git = shutil.which("git")
    if git is None:
        raise StepFailed(step, "git is not installed", "install git (https://git-scm.com/downloads) and run again")
    tag = f"v{version}"
    fix = (f"check the network and the URL, or point {REPOSITORY_VARIABLE} at a reachable copy of the ComfyUI "
           f"repository (e.g. {REPOSITORY_VARIABLE}=/path/to/ComfyUI.git), or set COMFYUI_PATH to an installed ComfyUI")
    listing = _run(step, [git, "ls-remote", "--tags", "--", url, f"refs/tags/{tag}"], REACH_TIMEOUT, fix, quiet=True)
    if tag not in listing:
        raise StepFailed(step, f"{url} has no tag {tag}", fix)


def _check_pip_may_install(step: str, command: str) -> None:
    """PEP 668: a Python that belongs to the system, where pip may not install, fails the step."""
    stdlib = sysconfig.get_path("stdlib")
    if sys.prefix == sys.base_prefix and stdlib and (Path(stdlib) / "EXTERNALLY-MANAGED").is_file():
        raise StepFailed(step, f"{sys.executable} is the system's Python (PEP 668), pip may not install into it",
                         "create a virtual environment and run the command with it: python3 -m venv .venv && "
                         f".venv/bin/python -m instantid {command}")


def _pip(step: str, *arguments: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *arguments]
    _run(step, command, PIP_TIMEOUT, f"run it by hand and read pip's message: {shlex.join(command)}")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def comfy_cli_command(workspace: Path, *, hardware: str, url: str, version: str, keep_torch: bool) -> list[str]:
    """comfy-cli's install, without prompts or ComfyUI-Manager; requirements.txt is left to
    install_requirements (which never lets pip replace torch)."""
    command = [sys.executable, "-m", "comfy_cli", "--workspace", str(workspace), "--skip-prompt", "install",
               "--url", url, "--version", version, "--skip-manager", "--skip-requirement", f"--{hardware}"]
    return command + (["--skip-torch-or-directml"] if keep_torch else [])


def install_comfyui(workspace: Path, *, hardware: str, url: str, version: str = COMFYUI_VERSION,
                    steps: Steps) -> None:
    """`comfy --workspace W install --url URL --version V --<hardware>` (comfy-cli's own install:
    clone, checkout of the release tag, torch for the hardware unless this interpreter has one).
    ComfyUI's requirements are installed afterwards by install_requirements."""
    step = "install ComfyUI"
    _check_pip_may_install(step, "...")
    if workspace.exists() and any(workspace.iterdir()):
        raise StepFailed(step, f"{workspace} exists but is not a ComfyUI checkout",
                         f"move it away (mv {shlex.quote(str(workspace))} {shlex.quote(str(workspace))}.old) or "
                         "set COMFYUI_PATH to your ComfyUI, then run again")
    check_repository(step, url, version)
    torch_version = installed_version("torch")
    command = comfy_cli_command(workspace, hardware=hardware, url=url, version=version, keep_torch=bool(torch_version))
    if torch_version:
        steps.say(f"    torch {torch_version} is installed in {sys.prefix}: keeping it")
        if hardware in ("nvidia", "amd") and "+cpu" in torch_version:
            log.warning("torch %s is a CPU build but this machine has an %s GPU; for GPU speed reinstall torch as "
                        "https://pytorch.org/get-started/locally/ shows", torch_version, hardware.upper())
    else:
        steps.say(f"    installing torch for {hardware} (a download of a few GB)")
    if importlib.util.find_spec("comfy_cli") is None:
        steps.say(f"    installing {COMFY_CLI_REQUIREMENT}")
        _pip(step, COMFY_CLI_REQUIREMENT)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    _run(step, command, INSTALL_TIMEOUT, f"run again (comfy-cli resumes), or install by hand: {shlex.join(command[2:])}")
    if not is_comfyui(workspace) or comfyui_version(workspace) != version:
        raise StepFailed(step, f"comfy-cli finished but {workspace} does not hold ComfyUI {version} "
                               f"(found {comfyui_version(workspace) if is_comfyui(workspace) else 'no ComfyUI'})",
                         f"remove {workspace} and run again")


def link_pack(comfyui: Path) -> str:
    """Make ComfyUI load this checkout: a link in custom_nodes/ (nothing when it is already there)."""
    custom_nodes = comfyui / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    for entry in custom_nodes.iterdir():
        if entry.resolve() == PACK_ROOT:
            return f"already in {entry}"
    link = custom_nodes / PACK_LINK_NAME
    if link.exists() or link.is_symlink():
        raise StepFailed("link the pack", f"{link} exists and is another copy of the pack",
                         f"remove it (rm -r {shlex.quote(str(link))}) to use this checkout, or run the commands from "
                         "that copy")
    try:
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    except OSError as error:
        raise StepFailed("link the pack", f"cannot create the link {link}: {error.strerror or error}",
                         f"copy this folder there instead: cp -r {shlex.quote(str(PACK_ROOT))} {shlex.quote(str(link))}")
    return f"linked {link} -> {PACK_ROOT}"


def missing_requirements(lines: list[str]) -> list[str]:
    """The requirement lines this interpreter does not satisfy (all of them when `packaging`, which
    pip and most environments carry, cannot be imported: then pip decides)."""
    wanted = [line.split(" #")[0].strip() for line in lines]
    wanted = [line for line in wanted if line and not line.startswith(("#", "-"))]
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return wanted
    missing = []
    for line in wanted:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            missing.append(line)
            continue
        if requirement.marker is None or requirement.marker.evaluate():
            installed = installed_version(requirement.name)
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                missing.append(line)
    return missing


def install_requirements(step: str, requirements: Path, *, skip: tuple[str, ...] = ()) -> str:
    """pip-install the lines of `requirements` this interpreter lacks (none: pip is not run)."""
    try:
        lines = requirements.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise StepFailed(step, f"cannot read {requirements}: {error.strerror or error}", "check the installation") from None
    skipped = {name.lower() for name in skip}
    names = [re.split(r"[<>=!~;\[ #@]", line.strip())[0].lower() for line in lines]
    missing = missing_requirements([line for line, name in zip(lines, names) if name not in skipped])
    if not missing:
        return "already installed"
    _pip(step, *missing)
    return f"installed {', '.join(missing)}"


def prepare_comfyui(*, workspace: Path | None = None, hardware: str | None = None, link: bool = True,
                    steps: Steps) -> Path:
    """ComfyUI ready to run this pack in this interpreter: found or installed, the pack linked
    (when `link`), the requirements of both installed. Takes four of `steps`' numbered lines
    (three without `link`)."""
    steps.start("find ComfyUI")
    comfyui = find_comfyui()
    if comfyui is None and workspace is not None and is_comfyui(workspace) and not os.environ.get("COMFYUI_PATH"):
        comfyui = workspace.resolve()  # installed there by an earlier run
    if comfyui is None and os.environ.get("COMFYUI_PATH"):
        raise StepFailed("find ComfyUI", f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} is not a ComfyUI checkout",
                         "point COMFYUI_PATH at the folder holding ComfyUI's main.py, or unset it to install ComfyUI")
    if comfyui is not None:
        steps.say(f"    found {comfyui} (ComfyUI {comfyui_version(comfyui)})")
        steps.start("install ComfyUI: not needed")
    else:
        target = workspace or default_workspace()
        hardware = hardware or detect_hardware()
        url = os.environ.get(REPOSITORY_VARIABLE) or COMFYUI_REPOSITORY
        steps.say("    none found")
        steps.start(f"install ComfyUI {COMFYUI_VERSION} for {hardware} from {url} into {target} (comfy-cli)")
        install_comfyui(target, hardware=hardware, url=url, steps=steps)
        comfyui = target.resolve()
    if link:
        steps.start("link this pack into ComfyUI's custom_nodes")
        steps.say(f"    {link_pack(comfyui)}")
    steps.start("install the Python packages of ComfyUI and of the pack")
    steps.say(f"    ComfyUI: {install_requirements('install Python packages', comfyui / 'requirements.txt', skip=TORCH_PACKAGES)}")
    steps.say(f"    pack: {install_requirements('install Python packages', PACK_ROOT / 'requirements.txt')}")
    return comfyui


def install_command_packages(missing: ModuleNotFoundError, argv: list[str]) -> int:
    """A command run on a Python without the pack's packages (a fresh clone). For the
    commands that set everything up, install requirements.txt and comfy-cli into this Python and
    start the command again; for the others, say what to install. Returns the exit code."""
    packages = ["-r", str(PACK_ROOT / "requirements.txt"), COMFY_CLI_REQUIREMENT]
    fix = shlex.join([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *packages])
    if not argv or argv[0] not in SETUP_COMMANDS or os.environ.get(_RESTARTED):
        sys.stderr.write(f"python -m instantid: this Python ({sys.executable}) lacks the package {missing.name!r} "
                         f"that the pack needs; install the pack's packages: {fix}\n")
        return 1
    steps = Steps(1)
    steps.start(f"install the pack's Python packages into {sys.prefix} (it lacks {missing.name})")
    try:
        _check_pip_may_install("install the pack's Python packages", shlex.join(argv))
        _pip("install the pack's Python packages", *packages)
    except StepFailed as error:
        sys.stderr.write(f"python -m instantid {argv[0]}: error: {error}\n")
        return 1
    os.environ[_RESTARTED] = "1"  # a second miss is reported, never installed in a loop
    os.execv(sys.executable, [sys.executable, "-m", "instantid", *argv])
