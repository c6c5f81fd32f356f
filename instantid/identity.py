"""The FACE_EMBEDS value: one person's identity (the raw ArcFace embeddings and where the face was)
and, once an adapter has made them, its face tokens.

The identity is what a saved identity file holds (see identity_files): face tokens depend on the
adapter, so they are recomputed from the raw embeddings by whichever adapter is in use, and a file
saved with one adapter works with another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter import FaceTokens
from .faces import COMBINE_MODES, EMBEDDING_SIZE, DetectedFace, combine_embeddings


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """One person as the reference photos showed them.

    embeddings: [N, 512] float32, the raw embedding of each reference face found (image order);
    combine: how the Apply that made them combined the N rows (faces.COMBINE_MODES);
    kps (5, 2) and bbox (4,) float32: the first face found, in pixels of a `image_size`
    (width, height) image, so its keypoint image can be drawn as the photo's would be;
    face_index: which face was taken (0 = the largest); metadata: what a loaded file recorded."""

    embeddings: torch.Tensor
    combine: str
    kps: np.ndarray
    bbox: np.ndarray
    image_size: tuple[int, int]
    face_index: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine mode {self.combine!r} is not one of {', '.join(COMBINE_MODES)}")
        shapes = {"embeddings": (tuple(self.embeddings.shape[1:]), (EMBEDDING_SIZE,)),
                  "kps": (tuple(np.shape(self.kps)), (5, 2)), "bbox": (tuple(np.shape(self.bbox)), (4,))}
        wrong = [f"{name} is {list(got)}, expected {list(want)}" for name, (got, want) in shapes.items() if got != want]
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] == 0:
            wrong.append(f"embeddings has shape {list(self.embeddings.shape)}, expected [N >= 1, {EMBEDDING_SIZE}]")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            wrong.append(f"image size {self.image_size} is not a positive (width, height)")
        if wrong:
            raise ValueError(f"not a usable face identity: {'; '.join(wrong)}")

    def embedding(self, combine: str | None = None) -> torch.Tensor:
        """What the Resampler gets: the rows combined with `combine` (default: as they were made)."""
        return combine_embeddings(self.embeddings, combine or self.combine)


def identity_from_faces(faces: list[DetectedFace | None], image_size: tuple[int, int], combine: str,
                        face_index: int = 0) -> FaceIdentity:
    """The identity of the reference faces that were found (at least one must be)."""
    found = [face for face in faces if face is not None]
    if not found:
        raise ValueError("no reference face was found, so there is no identity to describe")
    # float32 rows as detected: the same bytes a saved file restores, so the tokens are identical.
    embeddings = torch.from_numpy(np.stack([face.embedding for face in found]).astype(np.float32))
    return FaceIdentity(embeddings, combine, found[0].kps, found[0].bbox, (int(image_size[0]), int(image_size[1])),
                        int(face_index))


@dataclass(eq=False)
class FaceEmbeds:
    """What flows through a FACE_EMBEDS socket. `tokens` is None until an adapter has made them
    (a loaded file has none); `adapter_path` names the adapter that made them."""

    identity: FaceIdentity
    tokens: FaceTokens | None = None
    adapter_path: Path | None = None


class FaceTokensMissing(ValueError):
    """FACE_EMBEDS without face tokens reached a node that needs them."""


def as_face_embeds(value: object) -> FaceEmbeds:
    """This pack's FACE_EMBEDS, or a message naming what was connected instead."""
    if not isinstance(value, FaceEmbeds):
        what = "empty (an 'on_no_face: skip' upstream found no face?)" if value is None else f"a {type(value).__name__}"
        raise TypeError(f"face_embeds is {what}, not this pack's FACE_EMBEDS; connect the FACE_EMBEDS output of "
                        "'InstantID Patch Attention' or 'InstantID Load Face Embeds'.")
    return value


def tokens_of(face_embeds: FaceEmbeds) -> FaceTokens:
    """The face tokens, or a message saying how to get them."""
    face_embeds = as_face_embeds(face_embeds)
    if face_embeds.tokens is None:
        raise FaceTokensMissing(
            "These face embeds have no face tokens yet: a loaded identity holds the raw face embedding, and the "
            "tokens depend on the adapter. Pass them through 'InstantID Patch Attention' (its face_embeds input) "
            "and connect its FACE_EMBEDS output here.")
    return face_embeds.tokens
