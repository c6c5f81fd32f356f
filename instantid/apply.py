"""The steps every Apply node runs: check the inputs, find the faces, make the face tokens, patch
the model's cross-attention, attach the IdentityNet. Each node calls these functions; none of them
modifies its inputs (the model is cloned, conditioning lists are copied)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .adapter import FaceTokens, InstantIDAdapter
from .attention import FaceAttentionSettings, install_face_attention
from .checks import as_mask_batch, check_identitynet, sdxl_attention_widths
from .control import Conditioning, attach_identitynet
from .faces import DetectedFace, FaceAnalyzer, combine_embeddings, image_batch_to_bgr
from .keypoints import keypoint_image_batch

log = logging.getLogger(__name__)

ON_NO_FACE = ("error", "skip")


class NoFaceError(ValueError):
    """No usable face where one is needed; the message says which image and what to do."""


@dataclass
class Outcome:
    """What an Apply produced, plus notes for the UI and log (ignored images, skips)."""
    model: Any
    positive: Conditioning | None
    negative: Conditioning | None
    face_tokens: FaceTokens | None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False


def as_face_analyzer(face_analysis: Any) -> FaceAnalyzer:
    """Our FACEANALYSIS, or a raw insightface FaceAnalysis from another pack (same type name)."""
    return face_analysis if isinstance(face_analysis, FaceAnalyzer) else FaceAnalyzer.wrap(face_analysis)


def _image_list(indices: list[int]) -> str:
    return ", ".join(str(i + 1) for i in indices)


def detect_faces(analyzer: FaceAnalyzer, images: torch.Tensor) -> list[DetectedFace | None]:
    """The largest face of each image in a ComfyUI IMAGE batch (None where there is none)."""
    return [analyzer.detect(bgr) for bgr in image_batch_to_bgr(images)]


def reference_embedding(faces: list[DetectedFace | None], combine: str, on_no_face: str,
                        notes: list[str]) -> torch.Tensor | None:
    """The embedding fed to the Resampler from the reference faces; None when skipping."""
    missing = [i for i, face in enumerate(faces) if face is None]
    if len(missing) == len(faces):
        message = (f"no face found in the reference image{'s' if len(faces) > 1 else ''} "
                   f"(image{'s' if len(faces) > 1 else ''} {_image_list(missing)} of {len(faces)}). Use a photo where one face "
                   "is clearly visible and not cut off by the border (crop closer or pad it), or set on_no_face to 'skip' "
                   "to pass the model and conditioning through unchanged")
        if on_no_face == "error":
            raise NoFaceError(message[0].upper() + message[1:])
        notes.append(f"InstantID skipped: {message.split('. ')[0]}")
        return None
    if missing:
        notes.append(f"reference image{'s' if len(missing) > 1 else ''} {_image_list(missing)} of {len(faces)} had no face "
                     "and were ignored")
    embeddings = np.stack([face.embedding for face in faces if face is not None])
    return combine_embeddings(embeddings, combine)


def keypoints_from(analyzer: FaceAnalyzer, image_kps: torch.Tensor | None, references: torch.Tensor,
                   reference_faces: list[DetectedFace | None], on_no_face: str, notes: list[str]) -> torch.Tensor | None:
    """The five-point image for the IdentityNet: drawn from each pose image (positions kept: an
    image without a face gets a black frame in 'skip' mode), or from the first reference face.
    None when skipping because no pose image has a face."""
    if image_kps is None:
        face = next(f for f in reference_faces if f is not None)
        return keypoint_image_batch([face.kps], references.shape[2], references.shape[1])
    faces = detect_faces(analyzer, image_kps)
    missing = [i for i, face in enumerate(faces) if face is None]
    if missing:
        message = (f"no face found in the keypoint image{'s' if len(missing) > 1 else ''} {_image_list(missing)} of "
                   f"{len(faces)} (image_kps). Use a pose image with a clearly visible face, disconnect image_kps to take "
                   "the pose from the reference, or set on_no_face to 'skip'")
        if on_no_face == "error":
            raise NoFaceError(message[0].upper() + message[1:])
        if len(missing) == len(faces):
            notes.append(f"InstantID skipped: {message.split('. ')[0]}")
            return None
        notes.append(f"keypoint image{'s' if len(missing) > 1 else ''} {_image_list(missing)} had no face: "
                     "black keypoint frames (no pose constraint) at those positions")
    return keypoint_image_batch([None if f is None else f.kps for f in faces], image_kps.shape[2], image_kps.shape[1])


def face_tokens_for(adapter: InstantIDAdapter, analyzer: FaceAnalyzer, image: torch.Tensor, combine: str,
                    noise: float, on_no_face: str, notes: list[str]) -> tuple[FaceTokens | None, list[DetectedFace | None]]:
    """Detect the reference faces and turn them into face tokens (None when skipping)."""
    faces = detect_faces(analyzer, image)
    embedding = reference_embedding(faces, combine, on_no_face, notes)
    return (None if embedding is None else adapter.face_tokens(embedding, noise)), faces


def patched_model(model: Any, adapter: InstantIDAdapter, tokens: FaceTokens, weight: float, start_at: float,
                  end_at: float, mask: torch.Tensor | None) -> Any:
    """A clone of `model` with the face attention on all 70 cross-attention layers."""
    adapter.check_fits(sdxl_attention_widths(model))
    sampling = model.get_model_object("model_sampling")
    settings = FaceAttentionSettings(weight, sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at),
                                     as_mask_batch(mask))
    patched = model.clone()
    install_face_attention(patched, adapter.layer_kv(tokens), settings)
    return patched


def apply_instantid(*, adapter: InstantIDAdapter, face_analysis: Any, control_net: Any, image: torch.Tensor, model: Any,
                    positive: Conditioning, negative: Conditioning, ip_weight: float, cn_strength: float,
                    start_at: float, end_at: float, noise: float = 0.0, combine: str = "average",
                    image_kps: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    on_no_face: str = "error") -> Outcome:
    """ApplyInstantID / ApplyInstantIDAdvanced: face attention on the model and the IdentityNet on the
    conditioning. With on_no_face='skip' and no usable face, everything passes through unchanged."""
    widths = sdxl_attention_widths(model)
    adapter.check_fits(widths)
    check_identitynet(control_net)
    mask = as_mask_batch(mask)
    notes: list[str] = []
    analyzer = as_face_analyzer(face_analysis)
    tokens, faces = face_tokens_for(adapter, analyzer, image, combine, noise, on_no_face, notes)
    keypoints = None if tokens is None else keypoints_from(analyzer, image_kps, image, faces, on_no_face, notes)
    if tokens is None or keypoints is None:
        _log_notes(notes)
        return Outcome(model, positive, negative, None, notes, skipped=True)
    work_model = model if ip_weight == 0 else patched_model(model, adapter, tokens, ip_weight, start_at, end_at, mask)
    if cn_strength != 0:
        positive, negative = attach_identitynet(positive, negative, control_net, keypoints, cn_strength, start_at, end_at,
                                                tokens.cond, tokens.uncond, mask)
    _log_notes(notes)
    return Outcome(work_model, positive, negative, tokens, notes)


def apply_attention_only(*, adapter: InstantIDAdapter, face_analysis: Any, image: torch.Tensor, model: Any,
                         weight: float, start_at: float, end_at: float, noise: float = 0.0,
                         mask: torch.Tensor | None = None, on_no_face: str = "error") -> Outcome:
    """InstantIDAttentionPatch: face attention only; the face tokens go out for the ControlNet node."""
    adapter.check_fits(sdxl_attention_widths(model))
    mask = as_mask_batch(mask)
    notes: list[str] = []
    tokens, _ = face_tokens_for(adapter, as_face_analyzer(face_analysis), image, "average", noise, on_no_face, notes)
    if tokens is None:
        _log_notes(notes)
        return Outcome(model, None, None, None, notes, skipped=True)
    work_model = model if weight == 0 else patched_model(model, adapter, tokens, weight, start_at, end_at, mask)
    _log_notes(notes)
    return Outcome(work_model, None, None, tokens, notes)


def apply_control_only(*, face_tokens: FaceTokens | None, control_net: Any, image_kps: torch.Tensor,
                       positive: Conditioning, negative: Conditioning, strength: float, start_at: float,
                       end_at: float, mask: torch.Tensor | None = None) -> tuple[Conditioning, Conditioning]:
    """ApplyInstantIDControlNet: the IdentityNet with the given keypoint image as its hint."""
    if face_tokens is None or strength == 0:
        return positive, negative
    check_identitynet(control_net)
    return attach_identitynet(positive, negative, control_net, image_kps, strength, start_at, end_at,
                              face_tokens.cond, face_tokens.uncond, as_mask_batch(mask))


def keypoints_image(face_analysis: Any, image: torch.Tensor, on_no_face: str = "error") -> tuple[torch.Tensor, list[str]]:
    """FaceKeypointsPreprocessor: the five-point image of each image, positions kept."""
    notes: list[str] = []
    analyzer = as_face_analyzer(face_analysis)
    result = keypoints_from(analyzer, image, image, [], on_no_face, notes)
    _log_notes(notes)
    return (torch.zeros_like(image[..., :3]) if result is None else result), notes


def _log_notes(notes: list[str]) -> None:
    for note in notes:
        log.warning("InstantID: %s", note)
