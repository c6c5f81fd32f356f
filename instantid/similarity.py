"""Face similarity: how much a generated face looks like the reference person, as ArcFace sees it.

The score is the cosine similarity of the antelopev2 (ArcFace) embeddings of the largest face in
each image: the raw 512-d embeddings, L2-normalised, then dotted. 1.0 is the same embedding;
different people usually score below about 0.3, and a good InstantID result 0.5 to 0.8.

Several reference photos: each generated image is compared with every reference face and the
scores are averaged. Several generated images: one score each; the node outputs their mean.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .faces import FaceAnalyzer, image_batch_to_bgr
from .identity import FaceEmbeds

if TYPE_CHECKING:
    import torch


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
    """Per generated image: its mean similarity to the reference faces; `mean` over all images."""

    per_image: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_image))

    def text(self) -> str:
        """What the node shows, e.g. 'face similarity: 0.734' or with one value per image."""
        if len(self.per_image) == 1:
            return f"face similarity: {self.mean:.3f}"
        values = ", ".join(f"{value:.3f}" for value in self.per_image)
        return f"face similarity: {self.mean:.3f} (mean of {len(self.per_image)} images: {values})"


def _embeddings(analyzer: FaceAnalyzer, images: torch.Tensor, role: str, hint: str) -> list[np.ndarray]:
    bgr = image_batch_to_bgr(images)
    faces = [analyzer.detect(image) for image in bgr]
    missing = [index + 1 for index, face in enumerate(faces) if face is None]
    if missing:
        which = ", ".join(str(i) for i in missing)
        raise FaceNotFound(f"no face found in the {role} input (image {which} of {len(bgr)}): {hint}")
    return [face.embedding for face in faces]


def reference_embeddings(analyzer: FaceAnalyzer, reference: torch.Tensor | FaceEmbeds) -> list[np.ndarray]:
    """The reference faces' raw embeddings: those of a saved identity (FACE_EMBEDS), one per face it
    was made from, or those of the largest face in each image of an IMAGE batch."""
    if isinstance(reference, FaceEmbeds):
        return list(reference.identity.embeddings.numpy())
    return _embeddings(analyzer, reference, "reference", "use a photo where one face is clearly visible, frontal and not tiny")


def face_similarity(analyzer: FaceAnalyzer, reference: torch.Tensor | FaceEmbeds, image: torch.Tensor) -> Similarity:
    """Compare every image of the `image` batch with the `reference` (an IMAGE batch or FACE_EMBEDS).

    Raises FaceNotFound when an image of either batch has no detectable face."""
    references = reference_embeddings(analyzer, reference)
    generated = _embeddings(analyzer, image, "image",
                            "the generated image has no recognisable face, so there is nothing to compare; "
                            "check the prompt, the InstantID weight and the keypoint image")
    return Similarity(tuple(_mean_similarity(vector, references) for vector in generated))


def _mean_similarity(vector: np.ndarray, references: Sequence[np.ndarray]) -> float:
    return float(np.mean([cosine_similarity(vector, reference) for reference in references]))
