"""The IdentityNet attachment as the pack did it before the IdentityNet carried its own context:
the face tokens on the conditioning under ComfyUI's `cross_attn_controlnet` key (which every
ControlNet of a chain reads). Test-only: the reference the new route must reproduce bit for bit
in the plain case (one IdentityNet, nothing chained)."""
from __future__ import annotations

from typing import Any

import torch


def attach_identitynet_through_conditioning(positive: list, negative: list, control_net: Any,
                                            keypoint_image: torch.Tensor, strength: float, start_at: float,
                                            end_at: float, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor,
                                            mask: torch.Tensor | None = None, region: Any = None) -> tuple[list, list]:
    assert region is None, "the old route had no region"
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
