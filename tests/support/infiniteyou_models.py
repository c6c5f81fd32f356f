"""InfiniteYou's small files for tests, with the real key layouts and random weights: facexlib's
IR-SE50 state dict (`recognition_arcface_ir_se50.pth`) and the projection (`image_proj_model.bin`,
{"image_proj": Resampler state}). Real shapes, so the loaders' layout checks see what users' files
hold; the recogniser is 44 M and the projection 84 M parameters, built in about a second each.

The IR-SE50 keys are listed here from facexlib's Sequential indices (input_layer.0-2, body.N with
res_layer.0-5 and shortcut_layer.0-1, output_layer.0/3/4), independently of the pack's module.
"""
from __future__ import annotations

from pathlib import Path

import torch

STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


def _batch_norm(prefix: str, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(width, generator=generator),
            f"{prefix}.bias": 0.1 * torch.randn(width, generator=generator),
            f"{prefix}.running_mean": 0.1 * torch.randn(width, generator=generator),
            f"{prefix}.running_var": 0.5 + torch.rand(width, generator=generator),
            f"{prefix}.num_batches_tracked": torch.tensor(1000)}


def _conv(width_out: int, width_in: int, kernel: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(width_out, width_in, kernel, kernel, generator=generator) / (width_in * kernel * kernel) ** 0.5


def irse50_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """facexlib's Backbone(50, mode='ir_se') state dict with random weights (BN statistics too)."""
    g = torch.Generator().manual_seed(seed)
    state = {"input_layer.0.weight": _conv(64, 3, 3, g), **_batch_norm("input_layer.1", 64, g),
             "input_layer.2.weight": 0.25 + 0.05 * torch.randn(64, generator=g)}
    unit = 0
    for width_in, width_out, units in STAGES:
        for index in range(units):
            source = width_in if index == 0 else width_out
            p = f"body.{unit}"
            state |= _batch_norm(f"{p}.res_layer.0", source, g)
            state[f"{p}.res_layer.1.weight"] = _conv(width_out, source, 3, g)
            state[f"{p}.res_layer.2.weight"] = 0.25 + 0.05 * torch.randn(width_out, generator=g)
            state[f"{p}.res_layer.3.weight"] = _conv(width_out, width_out, 3, g)
            state |= _batch_norm(f"{p}.res_layer.4", width_out, g)
            state[f"{p}.res_layer.5.fc1.weight"] = _conv(width_out // 16, width_out, 1, g)
            state[f"{p}.res_layer.5.fc2.weight"] = _conv(width_out, width_out // 16, 1, g)
            if source != width_out:
                state[f"{p}.shortcut_layer.0.weight"] = _conv(width_out, source, 1, g)
                state |= _batch_norm(f"{p}.shortcut_layer.1", width_out, g)
            unit += 1
    state |= _batch_norm("output_layer.0", 512, g)
    state["output_layer.3.weight"] = torch.randn(512, 512 * 49, generator=g) / (512 * 49) ** 0.5
    state["output_layer.3.bias"] = 0.1 * torch.randn(512, generator=g)
    state |= _batch_norm("output_layer.4", 512, g)
    return state


def projection_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """InfiniteYou's projection (Resampler 1280 wide, 4 layers, 8 queries, 512 -> 4096) with random
    weights, under the IP-Adapter key names its file uses."""
    from resampler import Resampler

    torch.manual_seed(seed)
    projection = Resampler(dim=1280, depth=4, dim_head=64, heads=20, num_queries=8, embedding_dim=512,
                           output_dim=4096, ff_mult=4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorms away from their identity initialisation
        for name, parameter in projection.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=g))
    return {k: v.detach().clone() for k, v in projection.state_dict().items()}


def write_infiniteyou_files(folder: Path) -> tuple[Path, Path]:
    """models/infiniteyou/image_proj_model.bin and recognition_arcface_ir_se50.pth, as published."""
    folder.mkdir(parents=True, exist_ok=True)
    projection, recognizer = folder / "image_proj_model.bin", folder / "recognition_arcface_ir_se50.pth"
    if not projection.exists():
        torch.save({"image_proj": projection_state()}, projection)
    if not recognizer.exists():
        torch.save(irse50_state(), recognizer)
    return projection, recognizer
