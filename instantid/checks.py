"""Input checks that run before anything is patched, so a wrong model, ControlNet, image or mask
stops with a message that says what was given and what to do, never deep inside the sampler."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


class UnsupportedModelError(ValueError):
    """The MODEL or CONTROL_NET input cannot be used with this back end (SDXL InstantID, FLUX
    InfiniteYou); each back end's own checks (sdxl_checks, infiniteyou) raise it."""


# ComfyUI's model config class names (comfy.supported_models) as users know the families. Names
# not listed are shown as ComfyUI spells them, which is still specific enough to act on.
_FAMILY_NAMES = {
    "SD15": "Stable Diffusion 1.5", "SD15_instructpix2pix": "Stable Diffusion 1.5 InstructPix2Pix",
    "SD20": "Stable Diffusion 2.x", "SD21UnclipL": "Stable Diffusion 2.1 unCLIP",
    "SD21UnclipH": "Stable Diffusion 2.1 unCLIP", "SDXLRefiner": "the SDXL Refiner",
    "SSD1B": "SSD-1B (a distilled SDXL)", "Segmind_Vega": "Segmind Vega (a distilled SDXL)",
    "KOALA_700M": "KOALA-700M (a distilled SDXL)", "KOALA_1B": "KOALA-1B (a distilled SDXL)",
    "SD3": "Stable Diffusion 3 / 3.5", "Flux": "Flux", "FluxSchnell": "Flux Schnell",
    "FluxInpaint": "Flux Fill", "Flux2": "Flux 2", "AuraFlow": "AuraFlow", "PixArtAlpha": "PixArt-Alpha",
    "PixArtSigma": "PixArt-Sigma", "HunyuanDiT": "Hunyuan-DiT", "HunyuanDiT1": "Hunyuan-DiT",
    "Lumina2": "Lumina 2", "HiDream": "HiDream", "Chroma": "Chroma", "QwenImage": "Qwen-Image",
    "Stable_Cascade_C": "Stable Cascade", "Stable_Cascade_B": "Stable Cascade",
}
def describe_model(model: Any) -> str:
    """A short human name for a ComfyUI ModelPatcher's model, e.g.
    'Stable Diffusion 1.5 (ComfyUI: SD15, BaseModel)'."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if inner is None or config is None:
        return f"a {type(model).__name__}" if model is not None else "empty"
    config_name = type(config).__name__
    family = _FAMILY_NAMES.get(config_name, config_name)
    return f"{family} (ComfyUI: {config_name}, {type(inner).__name__})"


def as_mask_batch(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI MASK of any size as [N, H, W] float in 0..1 (2-D masks get a batch dimension)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[-1] == 0 or mask.shape[-2] == 0 or mask.shape[0] == 0:
        raise ValueError(f"The mask has shape {list(mask.shape)}; expected a MASK of [height, width] or "
                         "[batch, height, width] (e.g. from 'Load Image' (as Mask) or 'Solid Mask').")
    return mask.float().clamp(0, 1)


class SettingError(ValueError):
    """A number input that can do nothing sensible (NaN, infinite, an empty schedule)."""


@dataclass(frozen=True)
class NumberInput:
    """One FLOAT input of a node as the user sees it: its name, the value given and the range its
    widget allows (None where unknown)."""
    name: str
    value: Any
    low: float | None = None
    high: float | None = None


def float_inputs(schema_inputs: Iterable[Any], values: Mapping[str, Any]) -> list[NumberInput]:
    """Every FLOAT input of a node schema (ComfyUI io.Float.Input, read by duck typing so the domain
    needs no ComfyUI import) with the value the node was given; a new FLOAT input is included
    without anyone listing it."""
    return [NumberInput(item.id, values[item.id], getattr(item, "min", None), getattr(item, "max", None))
            for item in schema_inputs if item.get_io_type() == "FLOAT" and item.id in values]


def _range_text(number: NumberInput) -> str:
    if number.low is not None and number.high is not None:
        return f"a number from {number.low:g} to {number.high:g}"
    if number.low is not None:
        return f"a number of at least {number.low:g}"
    if number.high is not None:
        return f"a number of at most {number.high:g}"
    return "a finite number"


def check_finite(numbers: Iterable[NumberInput]) -> None:
    """SettingError for the first NaN or infinite value: ComfyUI's range check lets NaN through
    (every comparison with it is false), and a NaN strength turns the whole latent into NaN."""
    for number in numbers:
        value = number.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            what = "NaN (not a number)" if math.isnan(value) else f"{value} (infinite)"
            raise SettingError(
                f"The {number.name} input is {what}; it must be {_range_text(number)}. Set {number.name} to a value "
                f"in that range (if {number.name} is connected, the node feeding it made this value).")


def check_schedule(start: float, end: float, names: tuple[str, str] = ("start_at", "end_at")) -> None:
    """SettingError when the window [start, end] of the sampling schedule is empty: the part it
    controls would never act and its effect would silently vanish from the image."""
    if start > end:
        start_name, end_name = names
        raise SettingError(
            f"{start_name} ({start:g}) is after {end_name} ({end:g}), so this window of the schedule is empty and "
            f"InstantID would never act (the identity would silently vanish). Lower {start_name} to {end:g} or "
            f"less, or raise {end_name} to {start:g} or more (0 = first step, 1 = last step).")


def check_numbers(numbers: Sequence[NumberInput], start_at: float, end_at: float, **own: float) -> None:
    """The number checks each Apply runs first. `numbers` are the node's FLOAT inputs as the user
    named them, with their widget ranges (float_inputs); called without a node, the
    function's own arguments are checked under their own names."""
    check_finite(numbers or [NumberInput(name, value) for name, value in dict(own, start_at=start_at, end_at=end_at).items()])
    check_schedule(start_at, end_at)
