"""The faces and keypoints a node's inputs give: the chosen face of each image (batch positions
kept), the reference identity (photos or a saved identity), the keypoint frames for the IdentityNet
(from pose photos or drawings), and the no-face policy (`on_no_face`: an error naming the image, or
a skip with a note). Notes go to the node's UI text and the log."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .drawn_keypoints import keypoint_drawings
from .faces import DetectedFace, FaceAnalyzer, FaceIndexOutOfRange, Recognizer, image_batch_to_bgr
from .identity import FaceEmbeds, FaceIdentity, as_face_embeds, identity_from_faces
from .keypoints import CanvasFit, keypoint_image_batch
from .progress import each_image
from .regions import drawn_extent_boxes

log = logging.getLogger(__name__)

ON_NO_FACE = ("error", "skip")


class NoFaceError(ValueError):
    """No usable face where one is needed; the message says which image and what to do."""


class FaceIndexError(ValueError):
    """face_index asks for more faces than an image has; the message names the image and the count."""


class FaceAnalysisMissing(ValueError):
    """The insightface input is not connected where face analysis is needed."""


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
    for position, bgr in enumerate(each_image(bgr_images)):
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
                       combine: str | None, face_index: int, on_no_face: str, notes: list[str],
                       recognizers: tuple[Recognizer, ...] = ()) -> FaceIdentity | None:
    """Who to draw: the saved identity in `face_embeds`, else the reference faces found in `image`
    (images without a face are left out and named in `notes`); None when skipping because no
    image has a face. combine None keeps a saved identity's mode ('average' for photos). Each of
    `recognizers` also embeds every face found, at its detected points."""
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
                         "('InstantID Load Identity (Face Embeds)') to face_embeds.")
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
    return identity_from_faces(faces, (image.shape[2], image.shape[1]), combine or "average", face_index,
                               recognized_rows(recognizers, image, faces))


def recognized_rows(recognizers: tuple[Recognizer, ...], images: torch.Tensor,
                    faces: list[DetectedFace | None]) -> dict[str, torch.Tensor]:
    """{recogniser name: [found faces, 512]}: each recogniser's embedding of each face found, in
    image order (images without a face are left out, as in the identity)."""
    if not recognizers:
        return {}
    found = [(bgr, face) for bgr, face in zip(image_batch_to_bgr(images), faces) if face is not None]
    return {recognizer.name: torch.from_numpy(np.stack([recognizer.embed(bgr, face.kps) for bgr, face in found]))
            .to(torch.float32) for recognizer in recognizers}


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
        pose_photos = image_kps if len(photos) == len(image_kps) else image_kps[photos]  # indexing copies the batch
        for i, face in zip(photos, detect_faces(analyzer, pose_photos, notes, "keypoint image (image_kps)")):
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
