"""Attaching an identity ControlNet to positive and negative conditioning: the IdentityNet
(InstantID, SDXL) and the InfuseNet (InfiniteYou, FLUX's IdentityNet) alike.

The identity ControlNet attends to identity tokens instead of the prompt, and only it does: as in
the official multi-ControlNet pipelines, every other ControlNet in the chain (canny, depth, pose,
Control-LoRA, T2I-Adapter, a second identity) keeps its own context. So the tokens do not go on
the conditioning (ComfyUI's `cross_attn_controlnet` key, which every ControlNet of the chain would
read); the control object carries them and builds its context inside its own forward: identity
tokens for the positive rows and, for the negative rows, the uncond tokens or (uncond None: the
InfuseNet, whose reference pipeline runs its true-CFG negative pass without it) no residuals at all,
in the order of ComfyUI's `cond_or_uncond`. Positive and negative share one control object per
previous ControlNet, so ComfyUI batches them in one pass; an existing ControlNet on the
conditioning is chained before ours. A guidance value, when given, replaces the conditioning's
FLUX guidance for this ControlNet only (the InfuseNet's reference runs at 1.0 while the model gets
the FluxGuidance value).

An optional region (regions.IdentityRegion) multiplies the residuals at each resolution (the
official "enhance non-face region" mode and "identity only" masks); it reads both the UNet's
feature maps and FLUX's token sequences.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .regions import IdentityRegion

Conditioning = list[list[Any]]
POSITIVE = 0  # ComfyUI's cond_or_uncond value for positive rows


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


def positive_rows_only(control: dict[str, list], cond_or_uncond: list[int]) -> dict[str, list]:
    """The residuals with the negative chunks' rows set to zero (ComfyUI batches chunk-major).
    A tensor shared by several positions (FLUX repeats each block's residual) is scaled once."""
    scaled: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in scaled:
            chunks = x.reshape(len(cond_or_uncond), -1, *x.shape[1:])
            rows = torch.tensor([float(kind == POSITIVE) for kind in cond_or_uncond], device=x.device, dtype=x.dtype)
            scaled[id(x)] = (chunks * rows.reshape(-1, *[1] * (chunks.ndim - 1))).reshape(x.shape)
        return scaled[id(x)]

    return {name: [None if x is None else keep(x) for x in residuals] for name, residuals in control.items()}


@functools.cache
def identitynet_class() -> type:
    """The identity ControlNet class, a comfy.controlnet.ControlNet. Built on first use so that
    importing this module does not import ComfyUI."""
    from comfy.controlnet import ControlNet

    class IdentityNet(ControlNet):
        """A copy of a loaded ControlNet (weights shared) that attends to its own identity tokens,
        optionally at its own guidance, and optionally confines its residuals to a region."""

        instantid_identitynet = True

        def __init__(self, source: Any, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor | None,
                     region: IdentityRegion | None = None, guidance: float | None = None) -> None:
            super().__init__(None, global_average_pooling=source.global_average_pooling, load_device=source.load_device,
                             manual_cast_dtype=source.manual_cast_dtype)
            self.control_model = source.control_model
            self.control_model_wrapped = source.control_model_wrapped
            source.copy_to(self)
            self.face_tokens = (cond_tokens, uncond_tokens)  # [n, T, width] each: positive, negative (or None)
            self.region = region
            self.guidance = guidance
            self._contexts: dict[tuple, torch.Tensor] = {}

        def copy(self) -> "IdentityNet":
            copied = IdentityNet(self, *self.face_tokens, self.region, self.guidance)
            copied._contexts = self._contexts  # depends only on the tokens and the batch layout
            return copied

        def context(self, cond_or_uncond: list[int], rows: int, device: torch.device) -> torch.Tensor:
            """The context for one batched call: chunk j (rows/len(cond_or_uncond) rows) holds the
            identity tokens when cond_or_uncond[j] is 0 (positive), the uncond tokens when 1 (the
            identity tokens where there are none: those rows' residuals are dropped), each repeated to
            the chunk's size as ComfyUI repeats a conditioning tensor. Built once per batch layout
            and device."""
            key = (tuple(cond_or_uncond), rows, device)
            context = self._contexts.get(key)
            if context is None:
                import comfy.utils
                per_chunk = rows // len(cond_or_uncond)
                tokens = [self.face_tokens[i] if self.face_tokens[i] is not None else self.face_tokens[POSITIVE]
                          for i in cond_or_uncond]
                context = torch.cat([comfy.utils.repeat_to_batch_size(t, per_chunk) for t in tokens]).to(device)
                if len(self._contexts) > 8:
                    self._contexts.clear()
                self._contexts[key] = context
            return context

        def own_cond(self, cond: dict, x_noisy: torch.Tensor, cond_or_uncond: list[int]) -> dict:
            """The conditioning this ControlNet runs on: its own context and, if set, its guidance."""
            own = dict(cond, crossattn_controlnet=self.context(cond_or_uncond, x_noisy.shape[0], x_noisy.device))
            if self.guidance is not None:
                own["guidance"] = torch.full((x_noisy.shape[0],), float(self.guidance), device=x_noisy.device)
            return own

        def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                        transformer_options: dict) -> dict | None:
            previous = self.previous_controlnet
            # The rest of the chain runs on the conditioning as it came: its text context.
            control_prev = None if previous is None else previous.get_control(x_noisy, t, cond, batched_number,
                                                                               transformer_options)
            cond_or_uncond = transformer_options["cond_or_uncond"]
            # ControlNet.get_control would evaluate the previous ControlNet again, with our context:
            # detach it for this one call.
            self.previous_controlnet = None
            try:
                control = super().get_control(x_noisy, t, self.own_cond(cond, x_noisy, cond_or_uncond),
                                              batched_number, transformer_options)
            finally:
                self.previous_controlnet = previous
            if control is None:  # outside our own step window
                return control_prev
            if self.face_tokens[1] is None and any(kind != POSITIVE for kind in cond_or_uncond):
                control = positive_rows_only(control, cond_or_uncond)
            if self.region is not None:
                control = self.region.confine(control, x_noisy.shape[-2:], batched_number)
            return add_previous(control, control_prev)

    return IdentityNet


def attach_identitynet(positive: Conditioning, negative: Conditioning, control_net: Any, keypoint_image: torch.Tensor,
                       strength: float, start_at: float, end_at: float, cond_tokens: torch.Tensor,
                       uncond_tokens: torch.Tensor | None, mask: torch.Tensor | None = None,
                       region: IdentityRegion | None = None, vae: Any = None,
                       guidance: float | None = None) -> tuple[Conditioning, Conditioning]:
    """New positive/negative conditioning lists with the identity ControlNet attached; the inputs
    are not modified. keypoint_image: ComfyUI IMAGE [B, H, W, 3]. A mask makes the positive
    regional (its prompt and ControlNet act inside the mask), as the shared multi-ID workflows
    expect; a region confines only the ControlNet's residuals. vae: for a ControlNet whose hint is
    VAE-encoded (the InfuseNet); guidance: see the module text."""
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
                control = identitynet(control_net, cond_tokens, uncond_tokens, region, guidance)
                control.set_cond_hint(hint, strength, (start_at, end_at), vae=vae)
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
