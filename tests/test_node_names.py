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
    assert {"InsightFace", "antelopev2"} <= set(re.findall(r"\w+", names["InstantIDFaceAnalysis"]))
    assert "IPAdapter" in names["InstantIDModelLoader"]  # as users type it (and as IPAdapter_plus spells it)
    assert "Identity" in names["InstantIDSaveFaceEmbeds"] and "Identity" in names["InstantIDLoadFaceEmbeds"]
    # Short enough for the default node width: the frontend sizes a new node to its title, so a long
    # one makes a wide node; these stay under 40 characters.
    assert max(map(len, names.values())) <= 40, names
    # The search ranks names that start with the typed word first; "InfiniteYou" must stay within the
    # first 30 characters (farther in, the search's fuzzy match no longer finds it).
    for node_id in ("InfiniteYouModelLoader", "ApplyInfiniteYou"):
        assert names[node_id].startswith("FLUX ") and names[node_id].index("InfiniteYou") < 30, names[node_id]


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
    assert all("passes the model and conditioning through unchanged" in on_no_face[node_id]
               for node_id in ("ApplyInstantID", "ApplyInstantIDAdvanced"))
    # Patch Attention has no conditioning: it passes the model only.
    assert "passes the model through unchanged" in on_no_face["InstantIDAttentionPatch"]
    assert "conditioning" not in on_no_face["InstantIDAttentionPatch"]
    everything = " ".join(str(item.tooltip) for schema in found.values() for item in [*schema.inputs, *schema.outputs])
    everything += " ".join(schema.description for schema in found.values())
    for internal in ("POST /upload", "python -m instantid", "generated image"):
        assert internal not in everything, internal
    assert "passes the conditioning through unchanged" in on_no_face["ApplyInfiniteYou"]  # it patches no model
    assert set(on_no_face) == {"FaceKeypointsPreprocessor", "ApplyInstantID", "ApplyInstantIDAdvanced",
                               "InstantIDAttentionPatch", "ApplyInfiniteYou"}


def test_a_missing_reference_is_flagged_when_the_prompt_is_queued(comfy):
    """validate_inputs runs at queue time, before any model loads: no photo and no saved identity is an
    error that says what to connect; a wrong link type is still refused (ComfyUI skips its own check
    for a node that asks for input_types)."""
    nodes = comfy.pack_module("nodes")
    linked = {"instantid": "INSTANTID", "control_net": "CONTROL_NET", "model": "MODEL", "positive": "CONDITIONING",
              "negative": "CONDITIONING", "insightface": "FACEANALYSIS"}
    for node in (nodes.ApplyInstantID, nodes.ApplyInstantIDAdvanced, nodes.InstantIDAttentionPatch):
        message = node.validate_inputs(input_types=linked)
        assert isinstance(message, str) and "'image'" in message and "'face_embeds'" in message, node
        assert node.validate_inputs(input_types={**linked, "image": "IMAGE"}) is True
        assert node.validate_inputs(input_types={**linked, "face_embeds": "FACE_EMBEDS"}) is True
        assert node.validate_inputs(input_types={**linked, "image": "LATENT"}) == (
            "image is linked to a LATENT output; it takes IMAGE.")
    load = nodes.InstantIDLoadFaceEmbeds
    assert "upload button" in load.validate_inputs(face_embeds_file=nodes.NO_IDENTITY_FILES)
    assert "not a saved identity" in load.validate_inputs(face_embeds_file="nobody.safetensors")
