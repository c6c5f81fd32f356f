"""InstantID Face Similarity: a generated image without a face scores 0 with a note instead of failing
the job, and the node ranks a batch (best_image, ranked, a per-image scores text)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instantid.similarity import Similarity, cosine_similarity
from test_robustness import bgr
from support.workflows import loaded_image, preview_images, write_face_photo


def test_order_is_best_first_stable_and_faceless_last():
    result = Similarity((-0.2, 0.0, 0.5, 0.5, 0.0), faceless=(1, 4))
    assert result.order == (2, 3, 0, 1, 4)  # the negative score still ranks above images without a face
    assert result.mean == pytest.approx(0.16)
    assert result.notes == ["scored images 2, 5 of 5 had no face: scored 0 and ranked last"]
    assert result.text().splitlines() == ["face similarity: 0.160 (mean of 5 images)", "#1: image 3: 0.500",
                                          "#2: image 4: 0.500", "#3: image 1: -0.200", "#4: image 2: 0.000 (no face)",
                                          "#5: image 5: 0.000 (no face)",
                                          "scored images 2, 5 of 5 had no face: scored 0 and ranked last"]
    assert Similarity((0.734,)).text() == "face similarity: 0.734"


def test_batch_is_ranked_reference_other_then_no_face(comfy, caplog):
    inputs = comfy.base / "input"
    reference = write_face_photo(inputs / "similarity-reference.png", cell=(4, 3), g=128)
    other = write_face_photo(inputs / "similarity-other.png", cell=(5, 4), g=230)
    Image.fromarray(np.full((320, 320, 3), 90, np.uint8)).save(inputs / "similarity-no-face.png")

    def node(kind: str, **inputs) -> dict:
        return {"class_type": kind, "inputs": inputs}
    prompt = {
        "1": node("InstantIDFaceAnalysis", provider="CPU"),
        "2": node("LoadImage", image="similarity-reference.png"),
        "3": node("LoadImage", image="similarity-other.png"),
        "4": node("LoadImage", image="similarity-no-face.png"),
        # the batch in the "wrong" order: no face, other, reference
        "5": node("ImageBatch", image1=["4", 0], image2=["3", 0]),
        "6": node("ImageBatch", image1=["5", 0], image2=["2", 0]),
        "7": node("InstantIDFaceSimilarity", faceanalysis=["1", 0], reference=["2", 0], image=["6", 0]),
        "8": node("PreviewImage", images=["7", 2]),
        "9": node("PreviewImage", images=["7", 3]),
        "10": node("PreviewAny", source=["7", 1]),
    }
    result = comfy.run(prompt, reuse_outputs=False)
    assert result.success, result.error_text()
    pictures = {"reference": loaded_image(reference), "other": loaded_image(other),
                "no face": loaded_image(inputs / "similarity-no-face.png")}
    assert torch.equal(preview_images(result.outputs, "8"), pictures["reference"])
    ranked = torch.cat([pictures["reference"], pictures["other"], pictures["no face"]])
    assert torch.equal(preview_images(result.outputs, "9"), ranked)
    analyzer = comfy.pack_module("instantid.faces").FaceAnalyzer
    face_model = analyzer.load(comfy.base / "models" / "insightface" / "models" / "antelopev2", "CPU")
    embedding = {name: face_model.detect(bgr(image)) for name, image in pictures.items()}
    assert embedding["no face"] is None
    other_score = cosine_similarity(embedding["other"].embedding, embedding["reference"].embedding)
    assert 0 < other_score < 0.99
    scores = result.outputs["7"]["face_similarity"]
    assert scores == pytest.approx([0.0, other_score, 1.0])
    text = result.outputs["7"]["text"][0]
    assert text.splitlines() == [f"face similarity: {(other_score + 1) / 3:.3f} (mean of 3 images)",
                                 "#1: image 3: 1.000", f"#2: image 2: {other_score:.3f}",
                                 "#3: image 1: 0.000 (no face)",
                                 "scored image 1 of 3 had no face: scored 0 and ranked last"]
    assert result.outputs["10"]["text"] == [text]  # the STRING output carries the same text
    assert "scored image 1 of 3 had no face" in caplog.text


def test_a_faceless_reference_still_stops_with_the_message(comfy):
    inputs = comfy.base / "input"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(inputs / "similarity-black.png")
    write_face_photo(inputs / "similarity-reference.png")
    prompt = {"1": {"class_type": "InstantIDFaceAnalysis", "inputs": {"provider": "CPU"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "similarity-black.png"}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "similarity-reference.png"}},
              "4": {"class_type": "InstantIDFaceSimilarity",
                    "inputs": {"faceanalysis": ["1", 0], "reference": ["2", 0], "image": ["3", 0]}}}
    result = comfy.run(prompt, reuse_outputs=False)
    assert not result.success
    assert result.error["exception_message"].startswith("no face found in the reference input (image 1 of 1)")
