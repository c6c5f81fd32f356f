"""Finding a ComfyUI installation: COMFYUI_PATH, the folder above custom_nodes/ when this pack is
installed there, or comfy-cli's default workspace ~/comfy/ComfyUI. Used by the CLI and the tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
HOW_TO_FIX = ("set COMFYUI_PATH to a ComfyUI checkout, install this pack under ComfyUI/custom_nodes/, "
              "or install ComfyUI into ~/comfy/ComfyUI (comfy-cli's default workspace) with "
              "`python -m instantid install-comfyui`")


def is_comfyui(folder: Path) -> bool:
    return (folder / "comfy").is_dir() and (folder / "nodes.py").is_file() and (folder / "execution.py").is_file()


def comfyui_candidates() -> list[tuple[str, Path]]:
    """The places searched, in order, each with where it came from."""
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"]).expanduser()))
    if PACK_ROOT.parent.name == "custom_nodes":
        found.append(("the folder above custom_nodes/", PACK_ROOT.parent.parent))
    found.append(("comfy-cli's default workspace", default_workspace()))
    return found


def default_workspace() -> Path:
    """comfy-cli's default workspace: ~/comfy/ComfyUI, under ~/Documents on macOS and Windows."""
    documents = ("Documents",) if sys.platform in ("darwin", "win32") else ()
    return Path.home().joinpath(*documents, "comfy", "ComfyUI")


def find_comfyui() -> Path | None:
    """The first candidate holding a ComfyUI checkout. A COMFYUI_PATH that is not one is an answer
    too (None): the user asked for that folder, so another one is not silently used instead."""
    for source, folder in comfyui_candidates():
        if is_comfyui(folder):
            return folder.resolve()
        if source == "COMFYUI_PATH":
            return None
    return None


def why_not_found() -> str:
    searched = ", ".join(f"{folder} ({source})" for source, folder in comfyui_candidates())
    return f"ComfyUI not found (searched {searched}); {HOW_TO_FIX}"


def comfyui_version(comfyui: Path) -> str:
    """The version ComfyUI declares in comfyui_version.py, or 'unknown'."""
    text = (comfyui / "comfyui_version.py").read_text() if (comfyui / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
