"""The FLUX Apply path (ApplyInfiniteYou): check the inputs, find the faces (face_inputs), embed the
reference with IR-SE50, project it to 8 identity tokens, attach the InfuseNet as an identity
ControlNet (control.py, shared with the SDXL IdentityNet). The base model is not patched: the
identity acts only through the InfuseNet's residuals. Nothing given is modified.

Reference semantics (bytedance/InfiniteYou): the InfuseNet attends to the identity tokens with the
prompt's pooled CLIP vector and its own guidance (1.0), the model to the text at the FluxGuidance
value; without a pose image the hint is black. Under true CFG (cfg > 1) the negative rows get no
InfuseNet residuals, as the reference's true-CFG negative pass runs without the ControlNet; at
cfg 1 ComfyUI runs no negative pass at all.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checks import NumberInput, SettingError, as_mask_batch, check_numbers
from .control import Conditioning, attach_identitynet
from .face_inputs import check_on_no_face, keypoints_from, reference_identity
from .identity import FaceEmbeds, FaceIdentity
from .infiniteyou import HOW_TO_MAKE, INFINITEYOU, InfiniteYouModel, check_infusenet
from .regions import PROMPT_AND_IDENTITY, check_mask_scope, face_box_canvas, scoped_region

FOLLOW_FLUX_GUIDANCE = -1.0  # infusenet_guidance value that keeps ComfyUI's FluxGuidance for the InfuseNet


@dataclass
class FluxOutcome:
    """What ApplyInfiniteYou produced, plus notes for the UI and log."""
    positive: Conditioning
    negative: Conditioning
    face_embeds: FaceEmbeds | None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False


def check_infusenet_guidance(value: float) -> float | None:
    """The InfuseNet's own guidance, or None to keep the conditioning's (FluxGuidance)."""
    if value == FOLLOW_FLUX_GUIDANCE:
        return None
    if value < 0:
        raise SettingError(f"infusenet_guidance is {value:g}; use 0 or more (1.0 is the reference pipeline's value), "
                           f"or {FOLLOW_FLUX_GUIDANCE:g} to give the InfuseNet ComfyUI's FluxGuidance value.")
    return float(value)


def black_hint(identity: FaceIdentity) -> tuple[torch.Tensor, list[np.ndarray | None]]:
    """The reference pipeline's hint without a pose image: black, here at the reference image's
    size (ComfyUI scales a hint to the latent); the face box stays the reference face's."""
    width, height = identity.image_size
    return torch.zeros(1, height, width, 3), [identity.bbox]


def apply_infiniteyou(*, model: InfiniteYouModel, control_net: Any, vae: Any, positive: Conditioning,
                      negative: Conditioning, face_analysis: Any = None, image: torch.Tensor | None = None,
                      strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                      image_kps: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      on_no_face: str = "error", face_index: int = 0, face_region: bool = False,
                      mask_scope: str = PROMPT_AND_IDENTITY, face_embeds: FaceEmbeds | None = None,
                      infusenet_guidance: float = 1.0, numbers: Sequence[NumberInput] = ()) -> FluxOutcome:
    """ApplyInfiniteYou. With on_no_face='skip' and no usable face, the conditioning passes through."""
    check_numbers(numbers, start_at, end_at, strength=strength, infusenet_guidance=infusenet_guidance)
    guidance = check_infusenet_guidance(infusenet_guidance)
    check_on_no_face(on_no_face)
    check_mask_scope(mask_scope)
    check_infusenet(control_net)
    if vae is None:
        raise ValueError("The vae input is empty: the InfuseNet's hint is VAE-encoded; connect the FLUX VAE "
                         "(ae.safetensors from 'Load VAE').")
    mask = as_mask_batch(mask)
    notes: list[str] = []
    identity = reference_identity(face_analysis, image, face_embeds, None, face_index, on_no_face, notes,
                                  recognizers=(model.recognizer,))
    if identity is None:
        return FluxOutcome(positive, negative, None, notes, skipped=True)
    tokens = model.identity_tokens(identity.recognized_embedding(model.recognizer.name, HOW_TO_MAKE))
    posed = black_hint(identity) if image_kps is None else keypoints_from(face_analysis, image_kps, identity,
                                                                          on_no_face, notes)
    if posed is None:
        return FluxOutcome(positive, negative, None, notes, skipped=True)
    keypoints, boxes = posed
    made = FaceEmbeds(identity, tokens, model.path, made_by=INFINITEYOU)
    if strength == 0:
        return FluxOutcome(positive, negative, made, notes)
    face_box = face_box_canvas(boxes, keypoints.shape[2], keypoints.shape[1]) if face_region else None
    region, conditioning_mask = scoped_region(face_box, mask, mask_scope)
    positive, negative = attach_identitynet(positive, negative, control_net, keypoints, strength, start_at, end_at,
                                            tokens, None, conditioning_mask, region=region, vae=vae,
                                            guidance=guidance)
    return FluxOutcome(positive, negative, made, notes)
