"""Input checks that run before anything is patched, so a wrong model, ControlNet, image or mask
stops with a message that says what was given and what to do, never deep inside the sampler."""
from __future__ import annotations

from typing import Any

import torch

from .sdxl import ADM_CHANNELS, CONTEXT_DIM, attn2_widths


class UnsupportedModelError(ValueError):
    """The MODEL or CONTROL_NET input cannot be used with InstantID."""


def describe_model(model: Any) -> str:
    """A short human name for a ComfyUI ModelPatcher's model, e.g. 'SD15 (BaseModel)'."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    names = [type(config).__name__] if config is not None else []
    if inner is not None:
        names.append(type(inner).__name__)
    return f"{names[0]} ({names[1]})" if len(names) == 2 else (names[0] if names else type(model).__name__)


def sdxl_attention_widths(model: Any) -> list[int]:
    """The model's 70 cross-attention widths; UnsupportedModelError unless it is an SDXL UNet."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    context = getattr(getattr(model, "model", None), "model_config", None)
    unet_config = getattr(context, "unet_config", {}) or {}
    problem = None
    if diffusion_model is None:
        problem = "it is not a diffusion model"
    elif unet_config.get("context_dim") != CONTEXT_DIM or unet_config.get("adm_in_channels") != ADM_CHANNELS:
        problem = (f"its text context is {unet_config.get('context_dim')}-wide"
                   if unet_config.get("context_dim") != CONTEXT_DIM else "it lacks SDXL's size conditioning")
    else:
        try:
            return attn2_widths(diffusion_model)
        except (AttributeError, IndexError, StopIteration, TypeError):
            problem = "its UNet does not have SDXL's 70 cross-attention layers"
    raise UnsupportedModelError(
        f"InstantID needs an SDXL model, but the MODEL input is {describe_model(model)}: {problem}. "
        "InstantID weights exist only for SDXL (and SDXL fine-tunes such as Juggernaut, RealVis, Pony); "
        "load an SDXL checkpoint.")


def check_identitynet(control_net: Any) -> None:
    """UnsupportedModelError unless control_net is an SDXL ControlNet that takes 2048-wide context
    (the InstantID IdentityNet)."""
    name = type(control_net).__name__
    fix = ("connect the InstantID IdentityNet (ControlNetModel/diffusion_pytorch_model.safetensors from "
           "huggingface.co/InstantX/InstantID, in models/controlnet/) loaded with 'Load ControlNet Model'")
    if control_net is None:
        raise UnsupportedModelError(f"the control_net input is empty: the ControlNet file could not be loaded; {fix}")
    if name == "ControlLora":
        raise UnsupportedModelError(f"the control_net input is a Control-LoRA, not the IdentityNet; {fix}")
    control_model = getattr(control_net, "control_model", None)
    if control_model is None or not hasattr(control_net, "set_cond_hint"):
        raise UnsupportedModelError(f"the control_net input is a {name}, not a ControlNet; {fix}")
    context_width = next((m.to_k.in_features for m in control_model.modules()
                          if type(m).__name__ == "CrossAttention" and hasattr(m, "to_k") and m.to_k.in_features != m.to_q.in_features), None)
    label = getattr(control_model, "label_emb", None)
    adm = label[0][0].in_features if label is not None else None
    if context_width != CONTEXT_DIM or adm != ADM_CHANNELS:
        what = (f"a ControlNet for {context_width}-wide text context (SD1.5 is 768, SD2 1024)" if context_width != CONTEXT_DIM
                else "a ControlNet without SDXL's size conditioning")
        raise UnsupportedModelError(f"the control_net input is {what}, not the SDXL IdentityNet; {fix}")


def as_mask_batch(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI MASK of any size as [N, H, W] float in 0..1 (2-D masks get a batch dimension)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise ValueError(f"the mask has shape {list(mask.shape)}; expected a MASK of [height, width] or "
                         "[batch, height, width] (e.g. from 'Load Image' (as Mask) or 'Solid Mask')")
    return mask.float().clamp(0, 1)
