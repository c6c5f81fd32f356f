"""Attaching the IdentityNet (InstantID's ControlNet) to positive and negative conditioning.

The IdentityNet attends to the face tokens instead of the prompt: ComfyUI's `cross_attn_controlnet`
conditioning key carries them (positive: face tokens, negative: uncond tokens). Positive and
negative share one control object per previous ControlNet, so ComfyUI batches them in one pass;
an existing ControlNet on the conditioning is chained before ours.
"""
from __future__ import annotations

from typing import Any

import torch

Conditioning = list[list[Any]]


def attach_identitynet(positive: Conditioning, negative: Conditioning, control_net: Any, keypoint_image: torch.Tensor,
                       strength: float, start_at: float, end_at: float, cond_tokens: torch.Tensor,
                       uncond_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[Conditioning, Conditioning]:
    """New positive/negative conditioning lists with the IdentityNet attached; the inputs are not
    modified. keypoint_image: ComfyUI IMAGE [B, H, W, 3]. A mask makes the positive regional
    (its prompt and IdentityNet act inside the mask), as the shared multi-ID workflows expect."""
    hint = keypoint_image.movedim(-1, 1)
    controls: dict[int, Any] = {}
    results = []
    for conditioning, tokens, is_positive in ((positive, cond_tokens, True), (negative, uncond_tokens, False)):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if id(previous) not in controls:
                control = control_net.copy().set_cond_hint(hint, strength, (start_at, end_at))
                control.set_previous_controlnet(previous)
                controls[id(previous)] = control
            options["control"] = controls[id(previous)]
            options["control_apply_to_uncond"] = False
            options["cross_attn_controlnet"] = tokens
            if mask is not None and is_positive:
                options["mask"] = mask
                options["set_area_to_bounds"] = False
            entries.append([embedding, options])
        results.append(entries)
    return results[0], results[1]
