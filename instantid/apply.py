"""The steps every Apply node runs: check the inputs, find the faces, make the face tokens, patch
the model's cross-attention, attach the IdentityNet. Each node calls these functions; none of them
modifies its inputs (the model is cloned, conditioning lists are copied)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .adapter import FaceTokens, InstantIDAdapter
from .attention import FaceAttentionSettings, install_face_attention
from .checks import (NumberInput, as_mask_batch, check_finite, check_identitynet, check_schedule,
                     sdxl_attention_widths)
from .control import Conditioning, attach_identitynet
from .drawn_keypoints import keypoint_drawings
from .faces import DetectedFace, FaceAnalyzer, FaceIndexOutOfRange, image_batch_to_bgr
from .identity import FaceEmbeds, FaceIdentity, as_face_embeds, identity_from_faces, tokens_of
from .keypoints import CanvasFit, keypoint_image_batch
from .regions import IDENTITY_ONLY, PROMPT_AND_IDENTITY, IdentityRegion, check_mask_scope, drawn_extent_boxes, face_box_canvas

log = logging.getLogger(__name__)

ON_NO_FACE = ("error", "skip")


class NoFaceError(ValueError):
    """No usable face where one is needed; the message says which image and what to do."""


class FaceIndexError(ValueError):
    """face_index asks for more faces than an image has; the message names the image and the count."""


class FaceAnalysisMissing(ValueError):
    """The insightface input is not connected where face analysis is needed."""


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


def as_face_analyzer(face_analysis: Any, needed_for: str = "this node") -> FaceAnalyzer:
    """Our FACEANALYSIS, or a raw insightface FaceAnalysis from another pack (same type name).
    None (the optional insightface input left unconnected) stops with what needs it."""
    if face_analysis is None:
        raise FaceAnalysisMissing(
            f"The insightface input is not connected, but {needed_for} needs face analysis. Connect 'InstantID Face "
            "Analysis' to insightface; only a saved identity (face_embeds) without a pose photo (image_kps) runs "
            "without it.")
    return face_analysis if isinstance(face_analysis, FaceAnalyzer) else FaceAnalyzer.wrap(face_analysis)


def _image_list(indices: list[int]) -> str:
    return ", ".join(str(i + 1) for i in indices)


def _images(indices: list[int], total: int) -> str:
    """'image 2 of 3' / 'images 1, 3 of 3': 1-based, as the user counts a batch."""
    return f"image{'s' if len(indices) > 1 else ''} {_image_list(indices)} of {total}"


def check_numbers(numbers: Sequence[NumberInput], start_at: float, end_at: float, **own: float) -> None:
    """The number checks each Apply runs first. `numbers` are the node's FLOAT inputs as the user
    named them, with their widget ranges (checks.float_inputs); called without a node, the
    function's own arguments are checked under their own names."""
    check_finite(numbers or [NumberInput(name, value) for name, value in dict(own, start_at=start_at, end_at=end_at).items()])
    check_schedule(start_at, end_at)


def check_on_no_face(on_no_face: str) -> None:
    if on_no_face not in ON_NO_FACE:
        raise ValueError(f"on_no_face is {on_no_face!r}; choose one of {', '.join(ON_NO_FACE)}.")


_FACE_ADVICE = ("Use a photo with one clearly visible, front-facing face: crop closer if the face is small in the "
                "picture, pad the image if the face touches the border")


def _no_face(what: str, fix: str, on_no_face: str, notes: list[str]) -> None:
    """Raise NoFaceError (on_no_face='error'), or record that this Apply passes its inputs through."""
    if on_no_face == "error":
        raise NoFaceError(f"No face found in {what}. {fix}, or set on_no_face to 'skip' to pass the model and "
                          "conditioning through unchanged.")
    _note(notes, f"InstantID skipped (on_no_face='skip'): no face found in {what}; the model and conditioning "
                 "pass through unchanged")


def detect_faces(analyzer: FaceAnalyzer, images: torch.Tensor, notes: list[str] | None = None,
                 name: str = "image", face_index: int = 0) -> list[DetectedFace | None]:
    """The chosen face of each image in a ComfyUI IMAGE batch (None where there is none):
    face_index 0 = the largest, k = the k-th from the left. Asking for more faces than an image
    has stops with FaceIndexError naming the image and how many faces it has."""
    if notes is not None:
        _check_range(images, name, notes)
    bgr_images = image_batch_to_bgr(images)
    faces = []
    for position, bgr in enumerate(bgr_images):
        try:
            faces.append(analyzer.detect(bgr, face_index))
        except FaceIndexOutOfRange as error:
            found = f"{error.found} face{'' if error.found == 1 else 's'}"
            raise FaceIndexError(
                f"face_index {face_index} asks for face {face_index} from the left, but only {found} "
                f"{'was' if error.found == 1 else 'were'} found in {_images([position], len(bgr_images))} ({name}). "
                f"Set face_index to 1..{error.found} (counted from the left) or 0 (the largest face).") from error
    return faces


def _check_range(images: torch.Tensor, name: str, notes: list[str]) -> None:
    """Note (and log at once, before any no-face error) values outside ComfyUI's 0..1: they are
    clamped, and a 0..255 image clamps to almost white, which then looks like 'no face'."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(torch.nan_to_num(images.detach(), nan=0.0)))
    if low < -1e-3 or high > 1 + 1e-3:
        note = (f"the {name} values range from {low:g} to {high:g}, outside ComfyUI's 0..1; they were clamped"
                + (" (values up to 255 mean an upstream node did not divide by 255)" if high > 2 else ""))
        _note(notes, note)


def reference_identity(face_analysis: Any, image: torch.Tensor | None, face_embeds: FaceEmbeds | None,
                       combine: str | None, face_index: int, on_no_face: str, notes: list[str]) -> FaceIdentity | None:
    """Who to draw: the saved identity in `face_embeds`, else the reference faces found in `image`
    (images without a face are left out and named in `notes`); None when skipping because no
    image has a face. combine None keeps a saved identity's mode ('average' for photos)."""
    if face_embeds is not None:
        identity = as_face_embeds(face_embeds).identity
        if image is not None:
            _note(notes, "face_embeds is connected, so the identity comes from it and the image input is ignored")
        if combine is not None and combine != identity.combine and identity.embeddings.shape[0] > 1:
            _note(notes, f"the saved identity's {identity.embeddings.shape[0]} faces were combined with "
                         f"'{identity.combine}' when saved; here combine_embeds '{combine}' combines them")
        return identity
    if image is None:
        raise ValueError("No reference: connect a photo of the person to image, or a saved identity "
                         "('InstantID Load Face Embeds') to face_embeds.")
    faces = detect_faces(as_face_analyzer(face_analysis, "the reference image"), image, notes, "reference image",
                         face_index)
    missing = [i for i, face in enumerate(faces) if face is None]
    if len(missing) == len(faces):
        _no_face(f"the reference {_images(missing, len(faces))} (image input)", _FACE_ADVICE, on_no_face, notes)
        return None
    if missing:
        _note(notes, f"reference {_images(missing, len(faces))} had no face and "
                     f"{'were' if len(missing) > 1 else 'was'} ignored; the identity comes from the other "
                     f"{len(faces) - len(missing)}")
    return identity_from_faces(faces, (image.shape[2], image.shape[1]), combine or "average", face_index)


def keypoints_from(face_analysis: Any, image_kps: torch.Tensor | None, identity: FaceIdentity, on_no_face: str,
                   notes: list[str]) -> tuple[torch.Tensor, list[np.ndarray | None]] | None:
    """The five-point image for the IdentityNet and the face box of each frame (None for a black
    frame): a pose image that is already a keypoint drawing as is (its box: the drawn points'
    extent), else drawn from each pose photo (positions kept: a photo without a face gets a black
    frame in 'skip' mode), or from the identity's first reference face at its image's size. Never a
    pose photo itself. None when skipping because no pose image has a face or a drawing."""
    if image_kps is None:
        return keypoint_image_batch([identity.kps], *identity.image_size), [identity.bbox]
    drawn = [i for i, is_drawing in enumerate(keypoint_drawings(image_kps)) if is_drawing]
    if drawn:
        _note(notes, f"keypoint {_images(drawn, len(image_kps))} (image_kps) "
                     f"{'are keypoint drawings' if len(drawn) > 1 else 'is a keypoint drawing'}, used as the hint as is")
    photos = [i for i in range(len(image_kps)) if i not in drawn]
    faces: list[DetectedFace | None] = [None] * len(image_kps)
    if photos:
        analyzer = as_face_analyzer(face_analysis, "the pose image (image_kps)")
        for i, face in zip(photos, detect_faces(analyzer, image_kps[photos], notes, "keypoint image (image_kps)")):
            faces[i] = face
    missing = [i for i in photos if faces[i] is None]
    fix = (f"{_FACE_ADVICE}, or disconnect image_kps to take the pose from the reference (a keypoint drawing, "
           "black with the five coloured points as InstantID Face Keypoints (Pose) draws them, is used as is)")
    if len(missing) == len(faces):
        _no_face(f"the keypoint {_images(missing, len(faces))} (image_kps)", fix, on_no_face, notes)
        return None
    frames, boxes = _keypoint_frames(faces, image_kps, f"the keypoint {_images(missing, len(faces))} (image_kps)",
                                     f"keypoint {_images(missing, len(faces))}", fix, on_no_face, notes, missing)
    if drawn:
        frames[drawn] = image_kps[drawn, ..., :3].detach().to("cpu", torch.float32)
        for i, box in zip(drawn, drawn_extent_boxes(image_kps[drawn])):
            boxes[i] = None if box is None else np.float32(box)
    return frames, boxes


def _keypoint_frames(faces: list[DetectedFace | None], images: torch.Tensor, where: str, subject: str, fix: str,
                     on_no_face: str, notes: list[str], missing: list[int] | None = None,
                     fitting: CanvasFit | None = None) -> tuple[torch.Tensor, list[np.ndarray | None]]:
    """One keypoint frame per image and its face box (None for a black frame), positions kept, on
    the canvas `fitting` describes (default: the image's own size). An image without a face
    (`missing`, by default every None) stops with an error, or ('skip') gets a black frame: no pose
    constraint, never the photo itself."""
    missing = [i for i, face in enumerate(faces) if face is None] if missing is None else missing
    if missing and on_no_face == "error":
        raise NoFaceError(f"No face found in {where}. {fix}, or set on_no_face to 'skip' to get black frames "
                          "(no pose constraint) at those positions.")
    if missing:
        _note(notes, f"{subject} had no face: black keypoint frames (no pose constraint) at those positions, "
                     "the others keep theirs")
    fitting = fitting or CanvasFit()
    source = (images.shape[2], images.shape[1])
    return (keypoint_image_batch([None if f is None else fitting.points(f.kps, *source) for f in faces],
                                 *fitting.size(*source)),
            [None if f is None else f.bbox for f in faces])


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


# ComfyUI cuts a conditioning mask batch to the latent batch and then tiles it, so M masks crash the
# sampler for a latent batch N > M that M does not divide. Padding with the last mask (what the face
# attention does, see regions.mask_for_batch) makes every latent batch up to this size work.
CONDITIONING_MASK_BATCH = 16


def conditioning_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [N, H, W] mask for the positive conditioning: a single mask as is, a batch padded."""
    if mask is None or mask.shape[0] == 1 or mask.shape[0] >= CONDITIONING_MASK_BATCH:
        return mask
    return torch.cat([mask, mask[-1:].expand(CONDITIONING_MASK_BATCH - mask.shape[0], *mask.shape[1:])])


def follow(window_edge: float, schedule_edge: float) -> float:
    """A separate IdentityNet window edge; negative (the default -1) follows the shared schedule."""
    return schedule_edge if window_edge < 0 else window_edge


def _attach(positive: Conditioning, negative: Conditioning, control_net: Any, keypoints: torch.Tensor, strength: float,
            start_at: float, end_at: float, tokens: FaceTokens, mask: torch.Tensor | None, mask_scope: str,
            face_box: torch.Tensor | None) -> tuple[Conditioning, Conditioning]:
    """The IdentityNet with the mask in its scope: 'prompt and identity' makes the positive prompt
    regional (and the IdentityNet with it, through ComfyUI's conditioning mask), 'identity only'
    multiplies only the IdentityNet's residuals by it; a face box multiplies them in both."""
    identity_only = mask_scope == IDENTITY_ONLY
    residual_mask = mask if identity_only else None
    region = None if face_box is None and residual_mask is None else IdentityRegion(face_box, residual_mask)
    return attach_identitynet(positive, negative, control_net, keypoints, strength, start_at, end_at, tokens.cond,
                              tokens.uncond, None if identity_only else conditioning_mask(mask), region=region)


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
    FACE_EMBEDS for the ControlNet node and Save Face Embeds."""
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


def keypoints_image(face_analysis: Any, image: torch.Tensor, on_no_face: str = "error", fitting: CanvasFit | None = None,
                    face_index: int = 0) -> tuple[torch.Tensor, list[str]]:
    """FaceKeypointsPreprocessor: the five-point image of the chosen face of each image, positions
    kept, on the canvas `fitting` describes. With 'skip', an image without a face gets a black frame
    (no pose constraint), never the photo itself."""
    check_on_no_face(on_no_face)
    notes: list[str] = []
    faces = detect_faces(as_face_analyzer(face_analysis), image, notes, face_index=face_index)
    missing = [i for i, face in enumerate(faces) if face is None]
    frames, _ = _keypoint_frames(faces, image, f"{_images(missing, len(faces))} given to Face Keypoints Preprocessor",
                                 _images(missing, len(faces)), _FACE_ADVICE, on_no_face, notes, fitting=fitting)
    return frames, notes


def _note(notes: list[str], note: str) -> None:
    """Record a note for the node's UI text and log it at once (also when an error follows)."""
    log.warning("InstantID: %s", note)
    notes.append(note)
