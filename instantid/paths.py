"""Where the pack's models live inside a ComfyUI installation.

`models/instantid/` holds the adapter, `models/controlnet/` the IdentityNet and the InfuseNet (any
subfolder), `models/infiniteyou/` InfiniteYou's projection and IR-SE50 recogniser,
`models/insightface/models/antelopev2/` the face models. Folders from extra_model_paths.yaml
(keys `instantid`, `infiniteyou`, `insightface`) are kept and searched first.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

ADAPTER_FOLDER = "instantid"
INFINITEYOU_FOLDER = "infiniteyou"
FACE_MODELS_FOLDER = "insightface"
FETCH_COMMAND = "python -m instantid fetch-models"  # what the pack's messages tell a user to run


def register_model_folders(folder_paths: ModuleType) -> None:
    """Add the pack's folder names to ComfyUI's folder_paths, keeping any paths that
    extra_model_paths.yaml registered before the pack was imported."""
    weights = set(folder_paths.supported_pt_extensions)
    wanted = {ADAPTER_FOLDER: weights, INFINITEYOU_FOLDER: weights, FACE_MODELS_FOLDER: {".onnx"}}
    for name, extensions in wanted.items():
        default = os.path.join(folder_paths.models_dir, name)
        paths = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, extensions)


def face_model_roots(folder_paths: ModuleType) -> list[Path]:
    """The insightface roots to search for antelopev2, in ComfyUI's order."""
    return [Path(p) for p in folder_paths.get_folder_paths(FACE_MODELS_FOLDER)]
