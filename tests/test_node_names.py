"""What users type finds the nodes: the frontend's node search matches only node ids and display names,
so every display name carries "InstantID" (and the words users search for), ids stay as they were,
and tooltips describe behaviour without internals."""
from __future__ import annotations

import re

ORIGINAL_IDS = ["InstantIDModelLoader", "InstantIDFaceAnalysis", "FaceKeypointsPreprocessor", "ApplyInstantID",
                "ApplyInstantIDAdvanced", "InstantIDAttentionPatch", "ApplyInstantIDControlNet", "InstantIDFaceSimilarity"]
INTERNALS = re.compile(r"Resampler|cross_attn|attn2|patches_replace|K/V|\bkv\b|uncond", re.IGNORECASE)


def schemas(comfy) -> dict:
    return {node.GET_SCHEMA().node_id: node.GET_SCHEMA() for node in comfy.pack_module("nodes").NODES}


def test_display_names_carry_what_users_type_and_ids_stay(comfy):
    names = {node_id: schema.display_name for node_id, schema in schemas(comfy).items()}
    assert list(names)[:len(ORIGINAL_IDS)] == ORIGINAL_IDS  # new nodes come after the earlier pack's
    assert all("InstantID" in name for name in names.values()), names
    assert {"Keypoints", "Pose"} <= set(re.findall(r"\w+", names["FaceKeypointsPreprocessor"]))
    assert "InsightFace" in names["InstantIDFaceAnalysis"]
    assert all({"InfiniteYou", "FLUX"} <= set(re.findall(r"\w+", names[node_id]))
               for node_id in ("InfiniteYouModelLoader", "ApplyInfiniteYou"))


def test_tooltips_say_what_happens_without_internals(comfy):
    found = schemas(comfy)
    for node_id, schema in found.items():
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip and not INTERNALS.search(item.tooltip), (node_id, item.tooltip)
        assert schema.description and not INTERNALS.search(schema.description), node_id
    on_no_face = {node_id: next(i.tooltip for i in schema.inputs if i.id == "on_no_face")
                  for node_id, schema in found.items() if any(i.id == "on_no_face" for i in schema.inputs)}
    assert "black frame" in on_no_face["FaceKeypointsPreprocessor"]
    assert "passes the inputs through" not in on_no_face["FaceKeypointsPreprocessor"]
    assert all("passes the model and conditioning through unchanged" in tip
               for node_id, tip in on_no_face.items() if node_id not in ("FaceKeypointsPreprocessor", "ApplyInfiniteYou"))
    assert "passes the conditioning through unchanged" in on_no_face["ApplyInfiniteYou"]  # it patches no model
    assert set(on_no_face) == {"FaceKeypointsPreprocessor", "ApplyInstantID", "ApplyInstantIDAdvanced",
                               "InstantIDAttentionPatch", "ApplyInfiniteYou"}
