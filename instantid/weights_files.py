"""Reading a weights file safely: safetensors, or torch.load with weights_only (plain tensors and
containers only; a pickle that names Python code is refused before anything of it runs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class WeightsUnreadable(ValueError):
    """The file could not be read as weights; the message says why in one phrase."""


def read_weights(path: str | Path) -> Any:
    """The file's content on the CPU: a flat dict for safetensors, what torch.save stored otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnreadable("it does not exist")
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            import safetensors.torch
            return safetensors.torch.load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, unpickler and zip errors alike: one message
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Unsupported global" in str(error) or "Weights only load failed" in str(error):
            first = "it is a pickle that would run code when loaded, so it was refused and nothing of it ran"
        raise WeightsUnreadable(first) from error
