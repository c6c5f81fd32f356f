"""The FACE_EMBEDS value: one person's identity (the raw ArcFace embeddings and where the face was,
plus the embeddings of any second recogniser a back end uses) and, once a back end has made them,
its tokens.

The identity is what a saved identity file holds (see identity_files): tokens depend on the
adapter or projection, so they are recomputed from the raw embeddings by whichever is in use, and
a file saved with one adapter works with another. This module is the face front end: it knows no
back end's types, only the name of the back end that made the tokens.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .faces import COMBINE_MODES, EMBEDDING_SIZE, DetectedFace, combine_embeddings

INSTANTID = "instantid"  # the back end name of the SDXL face tokens


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """One person as the reference photos showed them.

    embeddings: [N, 512] float32, the raw embedding of each reference face found (image order);
    combine: how the Apply that made them combined the N rows (faces.COMBINE_MODES);
    kps (5, 2) and bbox (4,) float32: the first face found, in pixels of a `image_size`
    (width, height) image, so its keypoint image can be drawn as the photo's would be;
    face_index: which face was taken (0 = the largest); metadata: what a loaded file recorded;
    recognized: {recogniser name: [N, 512] float32}, the same faces embedded by a second recogniser
    (InfiniteYou's IR-SE50), rows in the order of `embeddings`."""

    embeddings: torch.Tensor
    combine: str
    kps: np.ndarray
    bbox: np.ndarray
    image_size: tuple[int, int]
    face_index: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    recognized: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine mode {self.combine!r} is not one of {', '.join(COMBINE_MODES)}")
        shapes = {"embeddings": (tuple(self.embeddings.shape[1:]), (EMBEDDING_SIZE,)),
                  "kps": (tuple(np.shape(self.kps)), (5, 2)), "bbox": (tuple(np.shape(self.bbox)), (4,))}
        wrong = [f"{name} is {list(got)}, expected {list(want)}" for name, (got, want) in shapes.items() if got != want]
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] == 0:
            wrong.append(f"embeddings has shape {list(self.embeddings.shape)}, expected [N >= 1, {EMBEDDING_SIZE}]")
        wrong += [f"{name} embeddings are {list(rows.shape)}, expected {[self.embeddings.shape[0], EMBEDDING_SIZE]}"
                  for name, rows in self.recognized.items() if tuple(rows.shape) != (self.embeddings.shape[0], EMBEDDING_SIZE)]
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            wrong.append(f"image size {self.image_size} is not a positive (width, height)")
        if wrong:
            raise ValueError(f"not a usable face identity: {'; '.join(wrong)}")

    def embedding(self, combine: str | None = None) -> torch.Tensor:
        """What the Resampler gets: the rows combined with `combine` (default: as they were made)."""
        return combine_embeddings(self.embeddings, combine or self.combine)

    def recognized_embedding(self, recognizer: str, how_to_make: str, combine: str | None = None) -> torch.Tensor:
        """The rows of a second recogniser, combined like embedding(); RecognizerEmbeddingMissing
        (with `how_to_make` as the fix) when this identity was made without that recogniser."""
        rows = self.recognized.get(recognizer)
        if rows is None:
            raise RecognizerEmbeddingMissing(
                f"This saved identity holds no {recognizer} face embedding (it was made "
                f"{'with ' + self.metadata['made_with'] if self.metadata.get('made_with') else 'without it'}). "
                f"{how_to_make}")
        return combine_embeddings(rows, combine or self.combine)


class RecognizerEmbeddingMissing(ValueError):
    """An identity lacks the embedding of the recogniser a back end needs."""


def identity_from_faces(faces: list[DetectedFace | None], image_size: tuple[int, int], combine: str,
                        face_index: int = 0, recognized: Mapping[str, torch.Tensor] | None = None) -> FaceIdentity:
    """The identity of the reference faces that were found (at least one must be); `recognized`:
    a second recogniser's rows for those faces (see FaceIdentity)."""
    found = [face for face in faces if face is not None]
    if not found:
        raise ValueError("no reference face was found, so there is no identity to describe")
    # float32 rows as detected: the same bytes a saved file restores, so the tokens are identical.
    embeddings = torch.from_numpy(np.stack([face.embedding for face in found]).astype(np.float32))
    return FaceIdentity(embeddings, combine, found[0].kps, found[0].bbox, (int(image_size[0]), int(image_size[1])),
                        int(face_index), recognized=dict(recognized or {}))


@dataclass(eq=False)
class FaceEmbeds:
    """What flows through a FACE_EMBEDS socket. `tokens` is None until a back end has made them
    (a loaded file has none); `made_by` names that back end (INSTANTID: the SDXL adapter's face
    tokens; 'infiniteyou': FLUX identity tokens) and `adapter_path` its weights file."""

    identity: FaceIdentity
    tokens: Any = None
    adapter_path: Path | None = None
    made_by: str = INSTANTID


class FaceTokensMissing(ValueError):
    """FACE_EMBEDS without face tokens reached a node that needs them."""


def as_face_embeds(value: object) -> FaceEmbeds:
    """This pack's FACE_EMBEDS, or a message naming what was connected instead."""
    if not isinstance(value, FaceEmbeds):
        what = "empty (an 'on_no_face: skip' upstream found no face?)" if value is None else f"a {type(value).__name__}"
        raise TypeError(f"face_embeds is {what}, not this pack's FACE_EMBEDS; connect the FACE_EMBEDS output of "
                        "'InstantID Patch Attention' or 'InstantID Load Identity (Face Embeds)'.")
    return value


def tokens_of(face_embeds: FaceEmbeds) -> Any:
    """The SDXL adapter's face tokens, or a message saying how to get them."""
    face_embeds = as_face_embeds(face_embeds)
    if face_embeds.tokens is None or face_embeds.made_by != INSTANTID:
        raise FaceTokensMissing(
            "These face embeds have no face tokens yet: a loaded identity holds the raw face embedding, and the "
            "tokens depend on the adapter. Pass them through 'InstantID Patch Attention' (its face_embeds input) "
            "and connect its FACE_EMBEDS output here.")
    return face_embeds.tokens
