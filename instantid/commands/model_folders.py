"""The model folders a command uses, the way ComfyUI would see them: the base directory
(--base-directory, ComfyUI Desktop's, or the ComfyUI found), the folders extra_model_paths.yaml files
register, and ComfyUI Desktop's own model config. `fetch-models`, `doctor`, `run` and `portrait`
all take their folders from here."""
from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..paths import ADAPTER_FOLDER, FACE_MODELS_FOLDER
from .comfy_home import default_base_directory, desktop_base_directory, desktop_models_config, why_not_found
from .errors import CommandError


class FolderError(CommandError, ValueError):
    """A model-folder option that cannot be used; the message is one actionable line."""


# ComfyUI's folder_paths: the old names extra_model_paths.yaml may still use (map_legacy), and the
# keys whose default is more than models/<key>.
LEGACY_FOLDER_KEYS = {"unet": "diffusion_models", "clip": "text_encoders"}
DEFAULT_MODEL_SUBFOLDERS = {"diffusion_models": ("unet", "diffusion_models"), "text_encoders": ("text_encoders", "clip"),
                            "controlnet": ("controlnet", "t2i_adapter")}


def read_extra_model_paths(config: Path) -> dict[str, list[Path]]:
    """The folders an extra_model_paths.yaml registers, per folder key, in the order ComfyUI's
    folder_paths would hold them (utils/extra_config.py): `base_path` (relative to the file) joins
    each newline-separated entry, paths without a base are relative to the file, and sections with
    `is_default: true` go to the front."""
    try:
        import yaml  # ComfyUI requires PyYAML; only this option needs it
    except ImportError:
        raise FolderError("reading --extra-model-paths-config needs PyYAML: pip install pyyaml") from None
    try:
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise FolderError(f"cannot read {config}: {error}".replace("\n", " ")) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise FolderError(f"{config}: expected sections of folder keys, got {type(document).__name__}")
    config_dir = Path(os.path.abspath(config)).parent  # abspath, not resolve: symlinks as ComfyUI sees them
    folders: dict[str, list[Path]] = {}
    for section, entries in document.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise FolderError(f"{config}: section {section!r} must map folder keys to paths")
        entries = dict(entries)
        base = entries.pop("base_path", None)
        if base is not None:
            base = Path(os.path.expandvars(os.path.expanduser(str(base))))
            base = base if base.is_absolute() else config_dir / base
        is_default = bool(entries.pop("is_default", False))
        for key, value in entries.items():
            if not isinstance(value, str):
                raise FolderError(f"{config}: {section}.{key} must be a path or newline-separated paths")
            for line in value.split("\n"):
                if not line:
                    continue
                path = Path(os.path.normpath((base or config_dir) / line))
                paths = folders.setdefault(LEGACY_FOLDER_KEYS.get(str(key), str(key)), [])
                if path in paths and is_default:
                    paths.remove(path)
                if is_default:
                    paths.insert(0, path)
                elif path not in paths:
                    paths.append(path)
    return folders


def comfyui_base(base_directory: Path | None, *, required: bool) -> Path | None:
    """ComfyUI's base directory (models/, custom_nodes/, input/, output/): --base-directory when
    given, else ComfyUI Desktop's base directory when ComfyUI is Desktop's, else the ComfyUI
    checkout comfy_home finds. None when there is none and not `required`."""
    if base_directory is not None:
        if not base_directory.is_dir():
            raise FolderError(f"--base-directory {base_directory} is not a directory")
        return base_directory
    found = default_base_directory()
    if found is None and required:
        raise FolderError(f"{why_not_found()}; or pass --base-directory DIR")
    return found


def registered_folders(configs: Iterable[Path]) -> dict[str, list[Path]]:
    """The folders several extra_model_paths.yaml files register, per key, in loading order."""
    merged: dict[str, list[Path]] = {}
    for config in configs:
        for key, paths in read_extra_model_paths(config).items():
            known = merged.setdefault(key, [])
            known += [path for path in paths if path not in known]
    return merged


def model_folders(keys: Iterable[str], base_directory: Path | None, extra_config: Path | None) -> dict[str, Path]:
    """Where each folder key's files go: the first folder extra_model_paths registers for it,
    else <ComfyUI base>/models/<key>. ComfyUI is looked up only when a key needs it."""
    registered = read_extra_model_paths(extra_config) if extra_config else {}
    folders = {key: registered[key][0] for key in keys if registered.get(key)}
    missing = [key for key in keys if key not in folders]
    if missing:
        base = comfyui_base(base_directory, required=True)
        folders.update({key: base / "models" / key for key in missing})
    return folders


def model_search_paths(keys: Iterable[str], base_directory: Path | None,
                       extra_configs: Sequence[Path]) -> dict[str, list[Path]]:
    """Every folder ComfyUI searches for each key. ComfyUI's own keys (controlnet) start with its
    defaults, <base>/models/<key> (DEFAULT_MODEL_SUBFOLDERS for a few keys); the pack's keys
    (instantid, insightface) list the registered folders first, as paths.register_model_folders
    does. Without a base only the registered folders."""
    registered = registered_folders(extra_configs)
    base = comfyui_base(base_directory, required=False)
    found = {}
    for key in keys:
        default = [base / "models" / folder for folder in DEFAULT_MODEL_SUBFOLDERS.get(key, (key,))] if base else []
        extra = [path for path in registered.get(key, []) if path not in default]
        found[key] = [*extra, *default] if key in (ADAPTER_FOLDER, FACE_MODELS_FOLDER) else [*default, *extra]
    return found


def comfyui_layout(base_directory: Path | None, extra_config: Path | None) -> tuple[Path | None, list[Path]]:
    """The base directory and the extra_model_paths.yaml files a ComfyUI started by this pack gets
    besides its own: the one given, else ComfyUI Desktop's base with Desktop's model config (what
    Desktop passes to its ComfyUI), then the user's config."""
    base = base_directory or desktop_base_directory()
    desktop_config = desktop_models_config(base) if base else None
    return base, [config for config in (desktop_config, extra_config) if config]


def first_existing(roots: Sequence[Path], relative: str) -> Path | None:
    """The first root holding `relative`, as ComfyUI's folder_paths searches."""
    return next((root / relative for root in roots if (root / relative).is_file()), None)


def config_files(comfyui: Path | None, base_directory: Path | None, extra_config: Path | None) -> list[Path]:
    """The extra_model_paths.yaml files ComfyUI reads: its own, ComfyUI Desktop's, and the one given."""
    own = comfyui / "extra_model_paths.yaml" if comfyui else None
    found = [config for config in (own, *comfyui_layout(base_directory, None)[1]) if config and config.is_file()]
    return found + ([extra_config] if extra_config else [])


def folder_flags(base_directory: Path | None, extra_config: Path | None) -> str:
    """The folder options given, as a command that repeats them takes them."""
    return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in (
        ("--base-directory", base_directory), ("--extra-model-paths-config", extra_config)) if value)
