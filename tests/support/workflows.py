"""Running shared UI-format workflows on the test bed: convert them to API format with comfy-cli's
converter (as `python -m instantid run` does), swap the checkpoint loader for the tiny fixture one,
shrink the size and step count, and put synthetic faces under the image names they load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from support import antelope

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
OLD_PACK_WORKFLOWS = REPO_ROOT.parent / "shared" / "compat" / "old-pack-workflows"


def write_face_photo(path: Path, cell: tuple[int, int] = (4, 3), g: int = 128, size: int = 320) -> Path:
    """An image file with one synthetic face (PNG bytes are fine under any name: PIL reads content)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    antelope.draw_face(pixels, cell, g, antelope.det_scale_for(size, size, 640))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def loaded_image(path: Path) -> torch.Tensor:
    """An image file as ComfyUI's LoadImage gives it: [1, H, W, 3] float32 in 0..1."""
    import torch
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0)[None]


def preview_images(outputs: dict, node_id: str) -> torch.Tensor:
    """The images a PreviewImage node wrote (PNG: exact for 8-bit values), as one IMAGE batch."""
    import folder_paths
    import torch
    return torch.cat([loaded_image(Path(folder_paths.get_temp_directory()) / image["subfolder"] / image["filename"])
                      for image in outputs[node_id]["images"]])


def prepare_for_test_bed(prompt: dict, unet_name: str, input_dir: Path, size: int = 64, steps: int = 2) -> dict:
    """The API prompt with real-weight loaders replaced by fixtures and a CPU-sized run."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "TestBedTinyCheckpoint", {"unet_name": unet_name}
        elif kind == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif kind == "KSampler":
            inputs["steps"] = steps
        elif kind == "LoadImage":
            write_face_photo(input_dir / inputs["image"])
    return prompt


def load_ui_workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
