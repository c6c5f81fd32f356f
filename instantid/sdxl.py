"""Facts about the SDXL UNet layout that the adapter and the attention patch share.

ComfyUI names a cross-attention layer by `(block, block_id, index inside the SpatialTransformer)`.
The adapter file numbers its per-layer weights in diffusers' processor order, down -> up -> mid,
counting self- and cross-attention alike, so the n-th cross-attention layer is processor 2n+1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type name only: the doctor reads these facts on a Python without torch
    from torch import nn

CONTEXT_DIM = 2048
ADM_CHANNELS = 2816

AttentionKey = tuple[str, int, int]

# Diffusers order: down_blocks (ComfyUI input 4,5,7,8), up_blocks (output 0..5), mid_block (middle 0).
# The middle block is ("middle", 0, i): ComfyUI never sets block id 1 there.
ATTN2_KEYS: tuple[AttentionKey, ...] = tuple(
    [("input", block, i) for block in (4, 5) for i in range(2)]
    + [("input", block, i) for block in (7, 8) for i in range(10)]
    + [("output", block, i) for block in (0, 1, 2) for i in range(10)]
    + [("output", block, i) for block in (3, 4, 5) for i in range(2)]
    + [("middle", 0, i) for i in range(10)])

ADAPTER_LAYER_NUMBERS: tuple[int, ...] = tuple(2 * n + 1 for n in range(len(ATTN2_KEYS)))


def adapter_key_names(layer_number: int) -> tuple[str, str]:
    return f"{layer_number}.to_k_ip.weight", f"{layer_number}.to_v_ip.weight"


def attn2_module(diffusion_model: nn.Module, key: AttentionKey) -> nn.Module:
    """The cross-attention module a ComfyUI attn2 key refers to (raises if the UNet lacks it)."""
    block, block_id, index = key
    if block == "middle":
        stage = diffusion_model.middle_block
    else:
        stage = (diffusion_model.input_blocks if block == "input" else diffusion_model.output_blocks)[block_id]
    transformer = next(m for m in stage if hasattr(m, "transformer_blocks"))
    return transformer.transformer_blocks[index].attn2


def attn2_widths(diffusion_model: nn.Module) -> list[int]:
    """Inner width (heads x head size) of each cross-attention layer, in ATTN2_KEYS order."""
    return [attn2_module(diffusion_model, key).to_q.out_features for key in ATTN2_KEYS]
