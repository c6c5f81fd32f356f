"""Running shared UI-format workflows on the test bed: convert them to API format with comfy-cli's
converter (as `python -m instantid run` does), swap the checkpoint loader for the tiny fixture one,
shrink the size and step count, and put synthetic faces under the image names they load."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from support import antelope

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# The team's shared folder beside the checkout; INSTANTID_OLD_PACK_WORKFLOWS points elsewhere (a worktree).
OLD_PACK_WORKFLOWS = Path(os.environ.get("INSTANTID_OLD_PACK_WORKFLOWS",
                                         REPO_ROOT.parent / "shared" / "compat" / "old-pack-workflows"))


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


def write_people_photo(path: Path, count: int, size: int = 320) -> Path:
    """An image file with `count` synthetic faces side by side, left to right (face_index 1, 2, …)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    scale = antelope.det_scale_for(size, size, 640)
    for index in range(count):
        antelope.draw_face(pixels, (2 + 6 * index, 8), 128, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_tiny_lora(path: Path, rank: int = 2, seed: int = 5) -> Path:
    """A LoRA in kohya's key format for one layer of the tiny SDXL UNet (its output conv)."""
    import torch
    from safetensors.torch import save_file

    from support.tiny_models import TINY_CHANNELS
    generator = torch.Generator().manual_seed(seed)
    tensors = {"lora_unet_out_2.lora_down.weight": torch.randn(rank, TINY_CHANNELS, 3, 3, generator=generator),
               "lora_unet_out_2.lora_up.weight": torch.randn(4, rank, 1, 1, generator=generator),
               "lora_unet_out_2.alpha": torch.tensor(float(rank))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _swap_lora_loader(prompt: dict, node_id: str) -> None:
    """LoraLoader → LoraLoaderModelOnly: the test bed's stand-in text encoder takes no LoRA, so the
    nodes that used the LoRA's CLIP get the CLIP that went into it."""
    node = prompt[node_id]
    clip_source = node["inputs"].pop("clip")
    node["inputs"].pop("strength_clip", None)
    node["class_type"] = "LoraLoaderModelOnly"
    for other in prompt.values():
        for name, value in other["inputs"].items():
            if value == [node_id, 1]:
                other["inputs"][name] = clip_source


def _stand_in_images(prompt: dict, input_dir: Path) -> None:
    """Photos the synthetic detector can read where one face per image would not do."""
    for node_id, node in list(prompt.items()):
        people = max([n["inputs"].get("face_index", 0) for n in prompt.values() if [node_id, 0] in n["inputs"].values()],
                     default=0)
        if node["class_type"] == "LoadImage" and people > 1:
            write_people_photo(input_dir / node["inputs"]["image"], people)
        kps = node["inputs"].get("image_kps")
        if isinstance(kps, list) and prompt[kps[0]]["class_type"] == "InstantIDFaceCrop":
            # The synthetic detector fires only on a marker filling one 32-px detector cell, which a crop centred
            # on the face never holds (its centre is a cell corner): the pose comes from a synthetic face photo.
            name = f"crop_pose_{node_id}.png"
            prompt[f"{node_id}_pose"] = {"class_type": "LoadImage", "inputs": {"image": name}}
            node["inputs"]["image_kps"] = [f"{node_id}_pose", 0]
            write_face_photo(input_dir / name)


def prepare_for_test_bed(prompt: dict, unet_name: str, input_dir: Path, size: int = 64, steps: int = 2,
                         crop_size: int = 128) -> dict:
    """The API prompt with real-weight loaders replaced by fixtures and a CPU-sized run: the
    checkpoint by the tiny UNet, any ControlNet by the fixture IdentityNet (an SDXL-layout
    ControlNet), a LoRA by a tiny one written under its name, images (and a generated image that a
    face crop repairs) by synthetic faces (as many side by side as a face_index that reads them
    asks for), face crops at crop_size. A FLUX graph (a checkpoint named flux…) runs on the FLUX
    bed instead: the FLUX-layout model with FLUX-shaped stand-ins, its ControlNets the InfuseNet."""
    from support.flux_bed import FLUX_NAME, INFUSENET_NAME
    from support.server import IDENTITYNET_NAME
    prompt = json.loads(json.dumps(prompt))
    models = input_dir.parent / "models"
    flux = any(n["class_type"] == "CheckpointLoaderSimple" and "flux" in n["inputs"]["ckpt_name"].lower()
               for n in prompt.values())
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = ("TestBedFluxCheckpoint", {"unet_name": FLUX_NAME}) if flux else \
                ("TestBedTinyCheckpoint", {"unet_name": unet_name})
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = INFUSENET_NAME if flux else IDENTITYNET_NAME
        elif kind == "InfiniteYouModelLoader":  # the bed's files (support.infiniteyou_models) at models/infiniteyou/
            inputs.update(projection_file="image_proj_model.bin", recognizer_file="recognition_arcface_ir_se50.pth")
        elif kind == "LoraLoader":
            write_tiny_lora(models / "loras" / inputs["lora_name"])
            _swap_lora_loader(prompt, node_id)
        elif kind == "InstantIDFaceCrop":
            inputs["size"] = crop_size
            source = inputs["image"][0]
            if prompt[source]["class_type"] == "VAEDecode":
                # The tiny model draws no face: the generated image to repair becomes a synthetic face photo.
                name = f"generated_{source}.png"
                prompt[source] = {"class_type": "LoadImage", "inputs": {"image": name}}
                write_face_photo(input_dir / name)
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=size, height=size)
        elif kind == "KSampler":
            inputs["steps"] = steps
        elif kind == "LoadImage":
            write_face_photo(input_dir / inputs["image"])
        elif kind == "InstantIDLoadFaceEmbeds":
            write_identity_file(input_dir / "instantid_faces" / inputs["face_embeds_file"].removesuffix(" [output]"))
    _stand_in_images(prompt, input_dir)
    return prompt


def write_identity_file(path: Path, cell: tuple[int, int] = (4, 3), g: int = 128, size: int = 320) -> Path:
    """A saved identity of the synthetic face write_face_photo draws, written from the documented file
    format (instantid/identity_files.py) with the synthetic recogniser's known output, not by the pack."""
    import safetensors.torch
    import torch

    scale = antelope.det_scale_for(size, size, 640)
    pixels = antelope.draw_face(np.zeros((size, size, 3), np.uint8), cell, g, scale)
    bbox, kps = antelope.expected_face(cell, g, scale)
    embedding = antelope.expected_embedding(np.ascontiguousarray(pixels[..., ::-1]), kps)
    tensors = {"embeddings": torch.tensor(embedding, dtype=torch.float32)[None],
               "kps": torch.tensor(kps, dtype=torch.float32), "bbox": torch.tensor(bbox, dtype=torch.float32),
               "image_size": torch.tensor([size, size], dtype=torch.int64)}
    metadata = {"format": "instantid-face-embeds", "format_version": "1", "combine": "average", "face_index": "0",
                "label": "synthetic test face", "pack_version": "test", "adapter_name": "", "adapter_sha256": ""}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def load_ui_workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def score_face_against(prompt: dict, image: str) -> dict:
    """The API prompt plus a face similarity between the Apply InstantID node's face image and
    `image` (a Load Image value): the tiny UNet draws no face, so the output cannot be scored."""
    from instantid.commands.portrait import apply_node
    _, apply = apply_node(prompt)
    prompt = dict(prompt)
    prompt["90"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["91"] = {"class_type": "InstantIDFaceSimilarity",
                    "inputs": {"faceanalysis": apply["inputs"]["insightface"], "reference": apply["inputs"]["image"],
                               "image": ["90", 0]}}
    return prompt
