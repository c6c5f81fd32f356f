"""Attaching the IdentityNet (InstantID's ControlNet) to positive and negative conditioning.

The IdentityNet attends to the face tokens instead of the prompt, and only it does: as in the
official multi-ControlNet pipeline, every other ControlNet in the chain (canny, depth, pose,
Control-LoRA, T2I-Adapter, a second InstantID) keeps its own context. So the tokens do not go on
the conditioning (ComfyUI's `cross_attn_controlnet` key, which every ControlNet of the chain would
read); the control object carries them and builds its context inside its own forward: face tokens
for the positive rows, uncond tokens for the negative rows, in the order of ComfyUI's
`cond_or_uncond`. Positive and negative share one control object per previous ControlNet, so
ComfyUI batches them in one pass; an existing ControlNet on the conditioning is chained before ours.

An optional region (regions.IdentityRegion) multiplies the IdentityNet's residuals at each
resolution (the official "enhance non-face region" mode and "identity only" masks).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .regions import IdentityRegion

Conditioning = list[list[Any]]


def add_previous(control: dict[str, list], control_prev: dict[str, list] | None) -> dict[str, list]:
    """Residuals of the previous ControlNet of the chain added to ours, position by position, as
    ComfyUI's ControlBase.control_merge adds them (a missing one on either side is taken as is)."""
    if control_prev is None:
        return control
    for name in ("input", "middle", "output"):
        ours = control.setdefault(name, [])
        for index, previous in enumerate(control_prev.get(name, [])):
            if index >= len(ours):
                ours.append(previous)
            elif previous is not None:
                ours[index] = previous if ours[index] is None else previous + ours[index]
    return control


@functools.cache
def identitynet_class() -> type:
    """The IdentityNet control class, a comfy.controlnet.ControlNet. Built on first use so that
    importing this module does not import ComfyUI."""
    from comfy.controlnet import ControlNet

    class IdentityNet(ControlNet):
        """A copy of a loaded ControlNet (weights shared) that attends to its own face tokens and
        optionally confines its residuals to a region."""

        instantid_identitynet = True

        def __init__(self, source: Any, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor,
                     region: IdentityRegion | None = None) -> None:
            super().__init__(None, global_average_pooling=source.global_average_pooling, load_device=source.load_device,
                             manual_cast_dtype=source.manual_cast_dtype)
            self.control_model = source.control_model
            self.control_model_wrapped = source.control_model_wrapped
            source.copy_to(self)
            self.face_tokens = (cond_tokens, uncond_tokens)  # [n, T, 2048] each: positive, negative
            self.region = region
            self._contexts: dict[tuple, torch.Tensor] = {}

        def copy(self) -> "IdentityNet":
            copied = IdentityNet(self, *self.face_tokens, self.region)
            copied._contexts = self._contexts  # depends only on the tokens and the batch layout
            return copied

        def context(self, cond_or_uncond: list[int], rows: int, device: torch.device) -> torch.Tensor:
            """The IdentityNet's context for one batched call: chunk j (rows/len(cond_or_uncond) rows)
            holds the face tokens when cond_or_uncond[j] is 0 (positive), the uncond tokens when 1,
            each repeated to the chunk's size as ComfyUI repeats a conditioning tensor. Built once
            per batch layout and device."""
            key = (tuple(cond_or_uncond), rows, device)
            context = self._contexts.get(key)
            if context is None:
                import comfy.utils
                per_chunk = rows // len(cond_or_uncond)
                context = torch.cat([comfy.utils.repeat_to_batch_size(self.face_tokens[i], per_chunk)
                                     for i in cond_or_uncond]).to(device)
                if len(self._contexts) > 8:
                    self._contexts.clear()
                self._contexts[key] = context
            return context

        def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                        transformer_options: dict) -> dict | None:
            previous = self.previous_controlnet
            # The rest of the chain runs on the conditioning as it came: its text context.
            control_prev = None if previous is None else previous.get_control(x_noisy, t, cond, batched_number,
                                                                               transformer_options)
            own_cond = dict(cond, crossattn_controlnet=self.context(transformer_options["cond_or_uncond"],
                                                                    x_noisy.shape[0], x_noisy.device))
            # ControlNet.get_control would evaluate the previous ControlNet again, with our context:
            # detach it for this one call.
            self.previous_controlnet = None
            try:
                control = super().get_control(x_noisy, t, own_cond, batched_number, transformer_options)
            finally:
                self.previous_controlnet = previous
            if control is None:  # outside our own step window
                return control_prev
            if self.region is not None:
                control = self.region.confine(control, x_noisy.shape[-2:], batched_number)
            return add_previous(control, control_prev)

    return IdentityNet


def attach_identitynet(positive: Conditioning, negative: Conditioning, control_net: Any, keypoint_image: torch.Tensor,
                       strength: float, start_at: float, end_at: float, cond_tokens: torch.Tensor,
                       uncond_tokens: torch.Tensor, mask: torch.Tensor | None = None,
                       region: IdentityRegion | None = None) -> tuple[Conditioning, Conditioning]:
    """New positive/negative conditioning lists with the IdentityNet attached; the inputs are not
    modified. keypoint_image: ComfyUI IMAGE [B, H, W, 3]. A mask makes the positive regional
    (its prompt and IdentityNet act inside the mask), as the shared multi-ID workflows expect; a
    region confines only the IdentityNet's residuals."""
    hint = keypoint_image.movedim(-1, 1)
    identitynet = identitynet_class()
    controls: dict[int, Any] = {}
    results = []
    for conditioning, is_positive in ((positive, True), (negative, False)):
        entries = []
        for embedding, options in conditioning:
            options = options.copy()
            previous = options.get("control")
            if id(previous) not in controls:
                control = identitynet(control_net, cond_tokens, uncond_tokens, region)
                control.set_cond_hint(hint, strength, (start_at, end_at))
                control.set_previous_controlnet(previous)
                controls[id(previous)] = control
            options["control"] = controls[id(previous)]
            options["control_apply_to_uncond"] = False
            if mask is not None and is_positive:
                options["mask"] = mask
                options["set_area_to_bounds"] = False
            entries.append([embedding, options])
        results.append(entries)
    return results[0], results[1]
