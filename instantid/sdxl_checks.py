"""The SDXL back end's input checks: the MODEL must be an SDXL UNet the face attention can patch
and the CONTROL_NET the SDXL InstantID IdentityNet. Shared wording and the error type come from
the front end's checks."""
from __future__ import annotations

from typing import Any

from .checks import UnsupportedModelError, describe_model
from .model_files import model_file
from .paths import FETCH_COMMAND
from .sdxl import ADM_CHANNELS, ATTN2_KEYS, CONTEXT_DIM, attn2_widths

# Text-context widths of the UNet families a wrong MODEL or ControlNet most often comes from.
_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2.x", 1280: "SDXL Refiner"}



def _model_problem(model: Any) -> str | None:
    """Why `model` is not an SDXL UNet InstantID can patch, or None when it is."""
    inner = getattr(model, "model", None)
    diffusion_model = getattr(inner, "diffusion_model", None)
    unet_config = getattr(getattr(inner, "model_config", None), "unet_config", {}) or {}
    if diffusion_model is None:
        return "it is not a diffusion model (connect the MODEL output of a checkpoint or UNet loader)"
    if not hasattr(diffusion_model, "input_blocks"):
        # SD3, Flux and other DiTs have no UNet cross-attention layers for the face attention, and
        # the IdentityNet is an SDXL UNet ControlNet.
        return (f"it is a transformer (DiT) model ({type(diffusion_model).__name__}), not a UNet with "
                "cross-attention layers")
    context = unet_config.get("context_dim")
    if context != CONTEXT_DIM:
        return f"its cross-attention takes {context}-wide text context where SDXL's takes {CONTEXT_DIM}"
    if unet_config.get("adm_in_channels") != ADM_CHANNELS:
        return "it lacks SDXL's size conditioning"
    return None


def sdxl_attention_widths(model: Any) -> list[int]:
    """The model's 70 cross-attention widths; UnsupportedModelError unless it is an SDXL UNet."""
    problem = _model_problem(model)
    if problem is None:
        try:
            return attn2_widths(model.model.diffusion_model)
        except (AttributeError, IndexError, StopIteration, TypeError):
            problem = f"its UNet does not have SDXL's {len(ATTN2_KEYS)} cross-attention layers (a pruned or distilled SDXL)"
    raise UnsupportedModelError(
        f"InstantID needs an SDXL model, but the MODEL input is {describe_model(model)}: {problem}. "
        "InstantID weights exist only for SDXL (and full-size SDXL fine-tunes such as Juggernaut, RealVis, Pony); "
        "load an SDXL checkpoint.")


def _describe_control(control_net: Any) -> str | None:
    """What a wrong CONTROL_NET input is, or None when it looks like an SDXL IdentityNet."""
    name = type(control_net).__name__
    if "ControlLora" in name:  # also ComfyUI-Advanced-ControlNet's ControlLoraAdvanced
        return "a Control-LoRA"
    if "T2IAdapter" in name:
        return "a T2I-Adapter"
    control_model = getattr(control_net, "control_model", None)
    if control_model is None or not hasattr(control_net, "set_cond_hint"):
        return f"a {name}, not a ControlNet"
    if not hasattr(control_model, "input_blocks"):
        return (f"a ControlNet for a transformer (DiT) model such as SD3 or Flux "
                f"({type(control_model).__module__}.{type(control_model).__name__})")
    context_width = next((m.to_k.in_features for m in control_model.modules()
                          if type(m).__name__ == "CrossAttention" and hasattr(m, "to_k")
                          and m.to_k.in_features != m.to_q.in_features), None)
    if context_width is None:
        return "a ControlNet without text cross-attention"
    if context_width != CONTEXT_DIM:
        family = _CONTEXT_FAMILIES.get(context_width)
        return (f"{'an ' + family if family else 'a'} ControlNet (its cross-attention takes {context_width}-wide "
                f"text context; the IdentityNet takes SDXL's {CONTEXT_DIM})")
    label = getattr(control_model, "label_emb", None)
    if label is None or label[0][0].in_features != ADM_CHANNELS:
        return "a ControlNet without SDXL's size conditioning"
    return None


def check_identitynet(control_net: Any) -> None:
    """UnsupportedModelError unless control_net is an SDXL ControlNet that takes 2048-wide context
    (the InstantID IdentityNet)."""
    identitynet = model_file("identitynet")
    fix = (f"load the InstantID IdentityNet with 'Load ControlNet Model': models/{identitynet.folder}/{identitynet.path}, "
           f"{identitynet.source} (`{FETCH_COMMAND}` puts it there)")
    if control_net is None:
        raise UnsupportedModelError(f"The control_net input is empty: the ControlNet file could not be loaded; {fix}.")
    what = _describe_control(control_net)
    if what is not None:
        raise UnsupportedModelError(f"The control_net input is {what}, not the SDXL InstantID IdentityNet; {fix}.")
