"""The steps every Apply node runs: check the inputs, find the faces (face_inputs), make the face
tokens, patch the model's cross-attention, attach the IdentityNet. Each node calls these
functions; none of them modifies its inputs (the model is cloned, conditioning lists are copied)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapter import FaceTokens, InstantIDAdapter
from .attention import FaceAttentionSettings, install_face_attention
from .checks import NumberInput, as_mask_batch, check_numbers, check_schedule
from .control import Conditioning, attach_identitynet
from .face_inputs import check_on_no_face, keypoints_from, reference_identity
from .identity import FaceEmbeds, FaceIdentity, tokens_of
from .regions import PROMPT_AND_IDENTITY, check_mask_scope, drawn_extent_boxes, face_box_canvas, scoped_region
from .sdxl_checks import check_identitynet, sdxl_attention_widths


@dataclass
class Outcome:
    """What an Apply produced, plus notes for the UI and log (ignored images, skips)."""
    model: Any
    positive: Conditioning | None
    negative: Conditioning | None
    face_tokens: FaceTokens | None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False
    face_embeds: FaceEmbeds | None = None


def face_tokens_for(adapter: InstantIDAdapter, identity: FaceIdentity | None, combine: str | None,
                    noise: float) -> FaceTokens | None:
    """The identity's face tokens from this adapter (None when skipping)."""
    return None if identity is None else adapter.face_tokens(identity.embedding(combine), noise)


def patched_model(model: Any, adapter: InstantIDAdapter, tokens: FaceTokens, weight: float, start_at: float,
                  end_at: float, mask: torch.Tensor | None, face_box: torch.Tensor | None = None) -> Any:
    """A clone of `model` with the face attention on all 70 cross-attention layers. The callers have
    checked the model against the adapter and normalised the mask (as_mask_batch) already."""
    sampling = model.get_model_object("model_sampling")
    settings = FaceAttentionSettings(weight, sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at), mask,
                                     face_box)
    patched = model.clone()
    install_face_attention(patched, adapter.layer_kv(tokens), settings)
    return patched


def follow(window_edge: float, schedule_edge: float) -> float:
    """A separate IdentityNet window edge; negative (the default -1) follows the shared schedule."""
    return schedule_edge if window_edge < 0 else window_edge


def _attach(positive: Conditioning, negative: Conditioning, control_net: Any, keypoints: torch.Tensor, strength: float,
            start_at: float, end_at: float, tokens: FaceTokens, mask: torch.Tensor | None, mask_scope: str,
            face_box: torch.Tensor | None) -> tuple[Conditioning, Conditioning]:
    """The IdentityNet with the mask in its scope (regions.scoped_region)."""
    region, conditioning_mask = scoped_region(face_box, mask, mask_scope)
    return attach_identitynet(positive, negative, control_net, keypoints, strength, start_at, end_at, tokens.cond,
                              tokens.uncond, conditioning_mask, region=region)


def apply_instantid(*, adapter: InstantIDAdapter, face_analysis: Any, control_net: Any, image: torch.Tensor | None,
                    model: Any, positive: Conditioning, negative: Conditioning, ip_weight: float, cn_strength: float,
                    start_at: float, end_at: float, noise: float = 0.0, combine: str | None = None,
                    image_kps: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    on_no_face: str = "error", face_region: bool = False, mask_scope: str = PROMPT_AND_IDENTITY,
                    cn_start_at: float = -1.0, cn_end_at: float = -1.0, face_index: int = 0,
                    face_embeds: FaceEmbeds | None = None, numbers: Sequence[NumberInput] = ()) -> Outcome:
    """ApplyInstantID / ApplyInstantIDAdvanced: face attention on the model and the IdentityNet on the
    conditioning. With on_no_face='skip' and no usable face, everything passes through unchanged.
    face_region confines both to the face box of the keypoint image; cn_start_at / cn_end_at (-1:
    follow start_at / end_at) time the IdentityNet apart from the face attention. face_embeds (a
    saved identity) replaces image; then face analysis is needed only for image_kps."""
    check_numbers(numbers, start_at, end_at, ip_weight=ip_weight, cn_strength=cn_strength, noise=noise,
                  cn_start_at=cn_start_at, cn_end_at=cn_end_at)
    cn_start, cn_end = follow(cn_start_at, start_at), follow(cn_end_at, end_at)
    # The IdentityNet's own window; a -1 end follows start_at/end_at, so the message names that input.
    check_schedule(cn_start, cn_end, ("cn_start_at" if cn_start_at >= 0 else "start_at",
                                      "cn_end_at" if cn_end_at >= 0 else "end_at"))
    check_on_no_face(on_no_face)
    check_mask_scope(mask_scope)
    adapter.check_fits(sdxl_attention_widths(model))
    check_identitynet(control_net)
    mask = as_mask_batch(mask)
    notes: list[str] = []
    identity = reference_identity(face_analysis, image, face_embeds, combine, face_index, on_no_face, notes)
    tokens = face_tokens_for(adapter, identity, combine, noise)
    posed = None if tokens is None else keypoints_from(face_analysis, image_kps, identity, on_no_face, notes)
    if tokens is None or posed is None:
        return Outcome(model, positive, negative, None, notes, skipped=True)
    keypoints, boxes = posed
    face_box = face_box_canvas(boxes, keypoints.shape[2], keypoints.shape[1]) if face_region else None
    work_model = model if ip_weight == 0 else patched_model(model, adapter, tokens, ip_weight, start_at, end_at, mask,
                                                            face_box)
    if cn_strength != 0:
        positive, negative = _attach(positive, negative, control_net, keypoints, cn_strength, cn_start, cn_end, tokens,
                                     mask, mask_scope, face_box)
    return Outcome(work_model, positive, negative, tokens, notes, face_embeds=FaceEmbeds(identity, tokens, adapter.path))


def apply_attention_only(*, adapter: InstantIDAdapter, face_analysis: Any, image: torch.Tensor | None, model: Any,
                         weight: float, start_at: float, end_at: float, noise: float = 0.0,
                         mask: torch.Tensor | None = None, on_no_face: str = "error", face_index: int = 0,
                         face_embeds: FaceEmbeds | None = None, numbers: Sequence[NumberInput] = ()) -> Outcome:
    """InstantIDAttentionPatch: face attention only; the identity and its face tokens go out as
    FACE_EMBEDS for the ControlNet node and InstantID Save Identity (Face Embeds)."""
    check_numbers(numbers, start_at, end_at, weight=weight, noise=noise)
    check_on_no_face(on_no_face)
    adapter.check_fits(sdxl_attention_widths(model))
    mask = as_mask_batch(mask)
    notes: list[str] = []
    identity = reference_identity(face_analysis, image, face_embeds, None, face_index, on_no_face, notes)
    tokens = face_tokens_for(adapter, identity, None, noise)
    if tokens is None:
        return Outcome(model, None, None, None, notes, skipped=True)
    work_model = model if weight == 0 else patched_model(model, adapter, tokens, weight, start_at, end_at, mask)
    return Outcome(work_model, None, None, tokens, notes, face_embeds=FaceEmbeds(identity, tokens, adapter.path))


def apply_control_only(*, face_embeds: FaceEmbeds | None, control_net: Any, image_kps: torch.Tensor,
                       positive: Conditioning, negative: Conditioning, strength: float, start_at: float,
                       end_at: float, mask: torch.Tensor | None = None, face_region: bool = False,
                       mask_scope: str = PROMPT_AND_IDENTITY,
                       numbers: Sequence[NumberInput] = ()) -> tuple[Conditioning, Conditioning]:
    """ApplyInstantIDControlNet: the IdentityNet with the given keypoint image as its hint. Its face
    region is the extent of the drawn keypoints (no face detection here)."""
    check_numbers(numbers, start_at, end_at, strength=strength)
    check_mask_scope(mask_scope)
    if face_embeds is None or strength == 0:
        return positive, negative
    face_tokens = tokens_of(face_embeds)
    check_identitynet(control_net)
    face_box = face_box_canvas(drawn_extent_boxes(image_kps), image_kps.shape[2], image_kps.shape[1]) if face_region else None
    return _attach(positive, negative, control_net, image_kps, strength, start_at, end_at, face_tokens,
                   as_mask_batch(mask), mask_scope, face_box)


