"""Finding a ComfyUI installation (the places: comfyui_candidates). Standard library only: it runs
before the pack's packages, or comfy-cli, are installed.

ComfyUI Desktop keeps ComfyUI itself inside the app (resources/ComfyUI) and starts it with
`--base-directory` set to the user's folder (models/, custom_nodes/, user/default/comfy.settings.json)
and `--extra-model-paths-config` set to extra_models_config.yaml in its app-data folder, next to the
config.json whose `basePath` names that base directory (github.com/Comfy-Org/desktop, README)."""
from __future__ import annotations

import configparser
import json
import os
import re
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
HOW_TO_FIX = ("set COMFYUI_PATH to a ComfyUI checkout, install this pack under ComfyUI/custom_nodes/, "
              "or install ComfyUI into ~/comfy/ComfyUI (comfy-cli's default workspace) with "
              "`python -m instantid install-comfyui`")
DESKTOP_SETTINGS = Path("user") / "default" / "comfy.settings.json"
DESKTOP_MODELS_CONFIG = "extra_models_config.yaml"


def is_comfyui(folder: Path) -> bool:
    return (folder / "comfy").is_dir() and (folder / "nodes.py").is_file() and (folder / "execution.py").is_file()


def desktop_app_data() -> Path | None:
    """ComfyUI Desktop's app-data folder on this OS (config.json, extra_models_config.yaml)."""
    if sys.platform == "win32":
        return Path(os.environ["APPDATA"]) / "ComfyUI" if os.environ.get("APPDATA") else None
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "ComfyUI"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ComfyUI"


def desktop_bundled_comfyui() -> list[Path]:
    """Where ComfyUI Desktop installs its own ComfyUI (it has no Linux package)."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return [Path(local) / "Programs" / "ComfyUI" / "resources" / "ComfyUI"] if local else []
    if sys.platform == "darwin":
        return [root / "ComfyUI.app" / "Contents" / "Resources" / "ComfyUI"
                for root in (Path("/Applications"), Path.home() / "Applications")]
    return []


def desktop_configured_base() -> Path | None:
    """The base directory ComfyUI Desktop was set up with (`basePath` in its config.json)."""
    app_data = desktop_app_data()
    try:
        base = json.loads((app_data / "config.json").read_text(encoding="utf-8")).get("basePath") if app_data else None
    except (OSError, ValueError, AttributeError):
        return None
    return Path(base).expanduser() if isinstance(base, str) and base else None


def _same(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _above_custom_nodes() -> Path | None:
    return PACK_ROOT.parent.parent if PACK_ROOT.parent.name == "custom_nodes" else None


def desktop_base_directory(base_directory: Path | None = None) -> Path | None:
    """The ComfyUI Desktop base directory in use: the one given, else the folder above
    custom_nodes/ holding this pack, else Desktop's configured one; None when none is a Desktop base."""
    configured = desktop_configured_base()
    for folder in (base_directory, _above_custom_nodes(), configured):
        # A Desktop base holds Desktop's comfy.settings.json, or Desktop's config.json names it.
        if folder is not None and ((folder / DESKTOP_SETTINGS).is_file() or configured and _same(folder, configured)):
            return folder
    return None


def desktop_models_config(base_directory: Path) -> Path | None:
    """Desktop's extra_models_config.yaml, which Desktop passes to ComfyUI for its base directory."""
    app_data = desktop_app_data()
    configured = desktop_configured_base()
    config = app_data / DESKTOP_MODELS_CONFIG if app_data else None
    if config is None or not config.is_file() or configured is None or not _same(configured, base_directory):
        return None
    return config


def comfyui_candidates(base_directory: Path | None = None) -> list[tuple[str, Path]]:
    """The places searched, in order, each with where it came from."""
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"]).expanduser()))
    if base_directory is not None:
        found.append(("--base-directory", base_directory))
    if _above_custom_nodes() is not None:
        found.append(("the folder above custom_nodes/", _above_custom_nodes()))
    found += [("ComfyUI Desktop's bundled ComfyUI", folder) for folder in desktop_bundled_comfyui()]
    settings = comfy_cli_settings()
    for key, source in (("default_workspace", "comfy-cli's default workspace (comfy set-default)"),
                        ("recent_workspace", "comfy-cli's most recent workspace")):
        if settings.get(key):
            found.append((source, Path(settings[key]).expanduser()))
    found.append(("comfy-cli's default workspace", comfy_cli_builtin_workspace()))
    return found


def comfy_cli_settings() -> dict[str, str]:
    """The DEFAULT section of comfy-cli's config.ini (its constants.DEFAULT_CONFIG), where `comfy
    set-default` writes default_workspace and every comfy-cli command its recent_workspace."""
    folder = {"win32": ("AppData", "Local"), "darwin": ("Library", "Application Support")}.get(sys.platform, (".config",))
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(Path.home().joinpath(*folder, "comfy-cli", "config.ini"), encoding="utf-8")
    except (OSError, configparser.Error):
        return {}
    return dict(parser["DEFAULT"])


def comfy_cli_builtin_workspace() -> Path:
    """comfy-cli's built-in default workspace: ~/comfy/ComfyUI, under ~/Documents on macOS and Windows."""
    documents = ("Documents",) if sys.platform in ("darwin", "win32") else ()
    return Path.home().joinpath(*documents, "comfy", "ComfyUI")


def default_workspace() -> Path:
    """Where comfy-cli installs ComfyUI: the workspace chosen with `comfy set-default`, else its built-in one."""
    chosen = comfy_cli_settings().get("default_workspace")
    return Path(chosen).expanduser() if chosen else comfy_cli_builtin_workspace()


def find_comfyui(base_directory: Path | None = None) -> Path | None:
    """The first candidate holding a ComfyUI checkout. A COMFYUI_PATH that is not one is an answer
    too (None): the user asked for that folder, so another one is not silently used instead."""
    for source, folder in comfyui_candidates(base_directory):
        if is_comfyui(folder):
            return folder.resolve()
        if source == "COMFYUI_PATH":
            return None
    return None


def default_base_directory() -> Path | None:
    """ComfyUI's base directory when --base-directory is not given: the ComfyUI Desktop base when
    ComfyUI is Desktop's own (or not found), else the ComfyUI checkout found."""
    comfyui = find_comfyui()
    if comfyui is not None and not any(_same(comfyui, bundled) for bundled in desktop_bundled_comfyui()):
        return comfyui
    return desktop_base_directory() or comfyui


def why_not_found(base_directory: Path | None = None) -> str:
    searched = ", ".join(f"{folder} ({source})" for source, folder in comfyui_candidates(base_directory))
    return f"ComfyUI not found (searched {searched}); {HOW_TO_FIX}"


def comfyui_version(comfyui: Path) -> str:
    """The version ComfyUI declares in comfyui_version.py, or 'unknown'."""
    text = (comfyui / "comfyui_version.py").read_text() if (comfyui / "comfyui_version.py").is_file() else ""
    found = re.search(r"^__version__\s*=\s*[\"']([^\"']*)", text, re.M)
    return found[1] if found else "unknown"
