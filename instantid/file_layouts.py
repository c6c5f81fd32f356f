"""What a model file is, told from its header alone (no tensor data read, no model built): a full
SDXL checkpoint, the SDXL IdentityNet, the InstantID adapter, a FLUX-side file, an ONNX face model.
Each *_problem function says why a file is not what its name promises (None when it is), in words a
user can act on; `doctor` reports them beside each file it finds."""
from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

from .faces import CPU_PROVIDER
from .model_files import INSTANTID_REPO, ModelFile
from .sdxl import ADM_CHANNELS, CONTEXT_DIM

# The prefixes of an SDXL checkpoint's parts (ComfyUI's supported_models.SDXL).
CHECKPOINT_PARTS = {"UNet": "model.diffusion_model.", "CLIP-L text encoder": "conditioner.embedders.0.",
                    "OpenCLIP-G text encoder": "conditioner.embedders.1.", "VAE": "first_stage_model."}


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a safetensors file's header, read with safetensors.safe_open (no
    tensor data is read). ValueError says why the file is not a complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            return {key: list(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except SafetensorError as error:
        if "not fully covered" in str(error) or "incomplete" in str(error):
            raise ValueError(f"truncated or padded: its {path.stat().st_size} bytes are not what its header describes; "
                             "the download is incomplete") from None
        raise ValueError("not a safetensors file (its header does not parse); the download is damaged or it is "
                         "another kind of file") from None


def context_widths(shapes: Mapping[str, list[int]], prefix: str = "") -> str:
    """The cross-attention text-context widths of the tensors under `prefix`: '2048', '768/1024' or 'no'."""
    return "/".join(map(str, sorted({shape[1] for key, shape in shapes.items() if key.startswith(prefix)
                                     and key.endswith("attn2.to_k.weight") and len(shape) == 2}))) or "no"


def checkpoint_problem(path: Path) -> tuple[str | None, str]:
    """(why Load Checkpoint cannot draw SDXL with it, or None; what it is): a full SDXL checkpoint
    holds the UNet, both text encoders and the VAE."""
    try:
        shapes = safetensors_shapes(path)
    except ValueError as error:
        return str(error), ""
    parts = {part for part, prefix in CHECKPOINT_PARTS.items() if any(key.startswith(prefix) for key in shapes)}
    if "UNet" not in parts:
        return "it has no UNet (no model.diffusion_model.* tensors): it is not a checkpoint", ""
    widths = context_widths(shapes, "model.diffusion_model.")
    if widths != str(CONTEXT_DIM):
        return (f"its UNet takes {widths}-wide text context (SD1.5 is 768, SD2 1024), not SDXL's {CONTEXT_DIM}: it is "
                "not an SDXL checkpoint"), ""
    if parts == {"UNet"}:
        return ("it is a UNet-only file (no text encoders, no VAE): Load Checkpoint cannot use it; load it with Load "
                "Diffusion Model, or pass a full SDXL checkpoint"), ""
    encoders = {"CLIP-L text encoder", "OpenCLIP-G text encoder"} - parts
    if encoders:
        return f"it has no {' and no '.join(sorted(encoders))}: an SDXL checkpoint without its text encoders", ""
    vae = "" if "VAE" in parts else " (no VAE: add a Load VAE)"
    return None, f"SDXL checkpoint: UNet, both text encoders{', VAE' if not vae else ''}{vae}"


def identitynet_problem(path: Path) -> tuple[str | None, str]:
    """(why it is not an SDXL ControlNet with 2048-wide context, or None; what it is)."""
    try:
        shapes = safetensors_shapes(path)
    except ValueError as error:
        return str(error), ""
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        layout, adm_key = "diffusers", "add_embedding.linear_1.weight"
    elif "input_hint_block.0.weight" in shapes:
        layout, adm_key = "ComfyUI/LDM", "label_emb.0.0.weight"
    elif any(k.startswith(("model.diffusion_model.", "up_blocks.", "output_blocks.")) for k in shapes):
        return "it is a UNet or checkpoint, not a ControlNet", ""
    else:
        return "it is not a ControlNet (no control hint encoder among its tensors)", ""
    adm = shapes.get(adm_key)
    if (widths := context_widths(shapes)) != str(CONTEXT_DIM):
        return (f"it is a ControlNet for {widths}-wide text context (SD1.5 is 768, SD2 1024), not SDXL's "
                f"{CONTEXT_DIM}; InstantID needs its IdentityNet from {INSTANTID_REPO}"), ""
    if not adm or len(adm) != 2 or adm[1] != ADM_CHANNELS:
        return f"it lacks SDXL's size conditioning ({ADM_CHANNELS}-wide); it is not the SDXL IdentityNet", ""
    layers = sum(key.endswith("attn2.to_k.weight") for key in shapes)
    return None, f"{layout} SDXL ControlNet, {layers} cross-attention layers with {CONTEXT_DIM}-wide context"


def adapter_problem(path: Path) -> tuple[str | None, str]:
    """(why `path` is not a usable InstantID adapter, or None; what it is). A torch zip archive is
    validated by `load_adapter` memory-mapped (headers only, no 1.7 GB read); anything else that is
    not .safetensors is refused: torch.save has written zip archives since torch 1.6."""
    from .adapter import AdapterFileError, load_adapter  # torch: imported only when a file is checked

    if path.suffix.lower() not in (".safetensors", ".sft") and not zipfile.is_zipfile(path):
        return ("not a PyTorch zip archive (the format of the published ip-adapter.bin): the download is truncated "
                "or damaged, or it is not a model file (an HTML error page?)"), ""
    try:
        load_adapter(path, mmap=True)
    except AdapterFileError as error:
        return str(error), ""
    except Exception as error:  # a damaged archive can fail anywhere inside torch
        return f"it could not be read ({type(error).__name__}: {error}); the download is damaged", ""
    return None, "InstantID adapter: face Resampler and 140 projections for SDXL's 70 layers"


# A key each FLUX-side safetensors file must hold: the InfuseNet's hint embedder (what ComfyUI's
# loader takes the InstantX FLUX path on), a FLUX checkpoint's first double block.
FLUX_KEYS = {"controlnet": "controlnet_x_embedder.weight", "checkpoints": "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"}


def flux_file_problem(entry: ModelFile, path: Path) -> tuple[str | None, str]:
    """A FLUX_CATALOG file's layout: safetensors by its header's key, .bin/.pth (torch zip archives) by format."""
    if path.suffix == ".safetensors":
        try:
            tensors = safetensors_shapes(path)
        except ValueError as error:
            return str(error), ""
        if FLUX_KEYS[entry.folder] not in tensors:
            return f"it has no '{FLUX_KEYS[entry.folder]}': not the {entry.id} file (wrong file under its name)", ""
        return None, f"{len(tensors)} tensors"
    if not zipfile.is_zipfile(path):
        return "not a PyTorch archive: the download is incomplete or it is another kind of file", ""
    return None, "PyTorch archive"


def onnx_problem(path: Path) -> str | None:
    """Why onnxruntime cannot load `path`, or None (a CPU session is built and dropped)."""
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(path), providers=[CPU_PROVIDER])
    except Exception as error:
        code = re.search(r": \d+ : ([A-Z_]+) :", str(error))
        reason = code.group(1) if code else type(error).__name__
        return (f"onnxruntime cannot load it ({reason}): the download is truncated or damaged, "
                "or it is not an ONNX model")
    return None
