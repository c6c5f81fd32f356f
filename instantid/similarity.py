"""Face similarity: how much a generated face looks like the reference person, as ArcFace sees it.

The score is the cosine similarity of the antelopev2 (ArcFace) embeddings of the largest face in
each image: the raw 512-d embeddings, L2-normalised, then dotted. 1.0 is the same embedding;
different people usually score below about 0.3, and a good InstantID result 0.5 to 0.8.

With a second recogniser (InfiniteYou's IR-SE50: faces still found by antelopev2, embedded by it at
their five points) the score is its embeddings' cosine similarity and the text names it.

Several reference photos: each generated image is compared with every reference face and the
scores are averaged. Several generated images: one score each (0 for an image without a face,
which never stops the job); the node outputs their mean, the best image and the batch ranked.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .faces import FaceAnalyzer, Recognizer, image_batch_to_bgr
from .identity import FaceEmbeds, RecognizerEmbeddingMissing
from .progress import each_image

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)


class FaceNotFound(ValueError):
    """An image given to the similarity has no detectable face; the message names it."""


def normalised(embedding: np.ndarray) -> np.ndarray:
    """The embedding as a float64 unit vector."""
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("a face embedding is all zeros or not finite, so it has no direction to compare")
    return vector / norm


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two raw embeddings, in -1..1."""
    return float(np.clip(normalised(a) @ normalised(b), -1.0, 1.0))


@dataclass(frozen=True)
class Similarity:
    """Per generated image: its mean similarity to the reference faces (0 for an image without a
    face, listed in `faceless`); `mean` over all images; `order` ranks them best first."""

    per_image: tuple[float, ...]
    faceless: tuple[int, ...] = ()
    recognizer: str = ""  # the label of a second recogniser that scored; empty: antelopev2

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_image))

    @property
    def order(self) -> tuple[int, ...]:
        """Image indices best first; ties keep batch order; images without a face come last."""
        return tuple(sorted(range(len(self.per_image)), key=lambda i: (i in self.faceless, -self.per_image[i])))

    @property
    def notes(self) -> list[str]:
        if not self.faceless:
            return []
        return [f"scored image{'s' if len(self.faceless) > 1 else ''} "
                f"{', '.join(str(i + 1) for i in self.faceless)} of {len(self.per_image)} had no face: "
                "scored 0 and ranked last"]

    def text(self) -> str:
        """What the node shows: 'face similarity: 0.734', and for a batch one line per image, best first."""
        by = f" by {self.recognizer}" if self.recognizer else ""
        if len(self.per_image) == 1:
            return "\n".join([f"face similarity{by}: {self.mean:.3f}", *self.notes])
        lines = [f"face similarity{by}: {self.mean:.3f} (mean of {len(self.per_image)} images)"]
        for rank, index in enumerate(self.order, start=1):
            lines.append(f"#{rank}: image {index + 1}: {self.per_image[index]:.3f}"
                         + (" (no face)" if index in self.faceless else ""))
        return "\n".join(lines + self.notes)


def _faces(analyzer: FaceAnalyzer, images: torch.Tensor, recognizer: Recognizer | None = None) -> list[np.ndarray | None]:
    """The embedding of the largest face of each image (None where there is none): antelopev2's,
    or `recognizer`'s at the face's points."""
    embeddings: list[np.ndarray | None] = []
    for bgr in each_image(image_batch_to_bgr(images)):
        face = analyzer.detect(bgr)
        embeddings.append(None if face is None else face.embedding if recognizer is None else recognizer.embed(bgr, face.kps))
    return embeddings


def reference_embeddings(analyzer: FaceAnalyzer, reference: torch.Tensor | FaceEmbeds,
                         recognizer: Recognizer | None = None) -> list[np.ndarray]:
    """The reference faces' raw embeddings: those of a saved identity (FACE_EMBEDS), one per face it
    was made from, or those of the largest face in each image of an IMAGE batch."""
    if isinstance(reference, FaceEmbeds):
        if recognizer is None:
            return list(reference.identity.embeddings.numpy())
        rows = reference.identity.recognized.get(recognizer.name)
        if rows is None:
            raise RecognizerEmbeddingMissing(f"The reference identity holds no {recognizer.label} embedding (it was saved without "
                               "InfiniteYou): connect the reference photo instead, or disconnect recognizer to score "
                               "with antelopev2.")
        return list(rows.numpy())
    faces = _faces(analyzer, reference, recognizer)
    missing = [index + 1 for index, face in enumerate(faces) if face is None]
    if missing:
        which = ", ".join(str(i) for i in missing)
        raise FaceNotFound(f"no face found in the reference input (image {which} of {len(faces)}): use a photo "
                           "where one face is clearly visible, frontal and not tiny")
    return faces


def face_similarity(analyzer: FaceAnalyzer, reference: torch.Tensor | FaceEmbeds, image: torch.Tensor,
                    recognizer: Recognizer | None = None) -> Similarity:
    """Compare every image of the `image` batch with the `reference` (an IMAGE batch or FACE_EMBEDS),
    with antelopev2's embeddings or, given, a second recogniser's.

    Raises FaceNotFound when a reference image has no detectable face. A generated image without a
    face scores 0 and is named in the result's notes (logged here too)."""
    references = reference_embeddings(analyzer, reference, recognizer)
    generated = _faces(analyzer, image, recognizer)
    result = Similarity(tuple(0.0 if vector is None else _mean_similarity(vector, references) for vector in generated),
                        tuple(i for i, vector in enumerate(generated) if vector is None),
                        "" if recognizer is None else recognizer.label)
    for note in result.notes:
        log.warning("InstantID Face Similarity: %s", note)
    return result


def ranked_images(images: torch.Tensor, result: Similarity) -> tuple[torch.Tensor, torch.Tensor]:
    """(the best image [1, H, W, C], the batch sorted best first)."""
    order = list(result.order)
    return images[order[:1]], images[order]


def _mean_similarity(vector: np.ndarray, references: Sequence[np.ndarray]) -> float:
    return float(np.mean([cosine_similarity(vector, reference) for reference in references]))
